"""The route table: the router and the OpenAPI document are both built from it.

Each route lists every status it can answer and, for each, the body by media
type (a pydantic model from :mod:`edge.response_models`, or a JSON schema for
files and event streams); ``tests/edge/test_schemathesis.py`` fuzzes the
server from the document and checks every answer against it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from aiohttp import web
from pydantic import BaseModel

from edge.handlers import (
    audio,
    chat,
    images,
    media,
    music,
    playground,
    segmentation,
    session,
    system,
    tasks,
    upscale,
    video,
)
from edge.metrics import get_metrics
from edge.middlewares import expect_continue
from edge.response_models import (
    BINARY,
    CHAT_EVENTS,
    Account,
    BatchImagesResponse,
    ChatCompletion,
    CloneLanguages,
    ErrorResponse,
    EventStream,
    GeneratedVideo,
    Health,
    ImagesResponse,
    ModelList,
    MusicDescription,
    PricePreview,
    Progress,
    Readiness,
    SegmentationResponse,
    StyleList,
    TaskEnvelope,
    TaskError,
    TaskObject,
    UpscaleResponse,
    VideoList,
    VoiceList,
)
from edge.responses import json_response
from edge.schemas import (
    BackgroundRemovalForm,
    BatchImageGenerationRequest,
    ChatCompletionRequest,
    ImageEditForm,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageToVideoForm,
    MusicCoverRequest,
    MusicGenerateRequest,
    MusicRepaintRequest,
    SegmentationForm,
    SpeechRequest,
    TaskCreateRequest,
    UpscaleRequest,
    VoiceCloneRequest,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A body's schema: a pydantic model (or one of several), server-sent events, or a JSON schema (files).
Schema: TypeAlias = type[BaseModel] | tuple[type[BaseModel], ...] | EventStream | Mapping[str, Any]


@dataclass(frozen=True)
class Answer:
    """One status a route answers: what it means, and its body per media type (none: no body)."""

    description: str
    content: Mapping[str, Schema] = field(default_factory=dict)


def _error(description: str) -> Answer:
    return Answer(description, {"application/json": ErrorResponse})


def _ok(description: str = "Success", /, **content: Schema) -> Answer:
    """A 200 whose bodies are given as ``json=``, ``sse=`` or a media type spelled with
    underscores (``image_png=``)."""
    names = {"json": "application/json", "sse": "text/event-stream"}
    return Answer(description, {names.get(k, k.replace("_", "/", 1)): v for k, v in content.items()})


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler
    summary: str
    body: type[BaseModel] | None = None
    #: Also accepted as multipart/form-data (text fields; files listed in `files`).
    form: type[BaseModel] | None = None
    files: tuple[str, ...] = ()
    authenticated: bool = True
    responses: Mapping[int, Answer] = field(default_factory=dict)
    #: Query parameters: name -> JSON schema (a paid route's ``dry_run`` is added).
    query: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    #: The security schemes of a route that checks its credential itself (``authenticated``
    #: routes take an API key, a bearer token or the session cookie).
    security: tuple[str, ...] = ()

    @property
    def paid(self) -> bool:
        """A paid synchronous route (its answers built by :func:`_paid`: its 200 may be a price
        preview): it takes ``?dry_run`` (``edge.flow``). ``/v1/tasks`` is not one: its
        ``dry_run`` is a body field only."""
        ok = self.responses.get(200)
        body = ok.content.get("application/json") if ok is not None else None
        return body is PricePreview or (isinstance(body, tuple) and PricePreview in body)


#: What every paid route can answer besides its 200.
_PAID_ERRORS: dict[int, Answer] = {
    400: _error("invalid_request_error: a bad parameter, model or file"),
    401: _error("authentication_error: no or an unknown credential"),
    402: _error("insufficient_credits"),
    403: _error(
        "premium_required; or authentication_error: the session cookie without the session's X-CSRF-Token"
    ),
    408: _error("invalid_request_error: the request body arrived too slowly"),
    409: _error("invalid_request_error: a request with this Idempotency-Key is in progress"),
    413: _error("invalid_request_error: the body is larger than the limit, or the form has too many parts"),
    429: _error("rate_limit_error: requests per minute or jobs in flight over the account's limit"),
    500: _error("processing_error"),
    503: _error("maintenance_mode, or the disk is too full for new work"),
}
_IMAGE_FILES = {"image/png": BINARY, "image/jpeg": BINARY, "image/webp": BINARY}
_AUDIO_FILES = {f"audio/{kind}": BINARY for kind in ("wav", "pcm", "mpeg", "opus", "aac", "flac")}


def _progress(result: type[BaseModel]) -> dict[str, Schema]:
    """``Accept: text/event-stream``: ``progress`` events, then ``result`` (the JSON body) or ``error``."""
    return {
        "text/event-stream": EventStream((Progress, result, ErrorResponse), ("progress", "result", "error"))
    }


_MEDIA_FILES = {**_IMAGE_FILES, **_AUDIO_FILES, "video/mp4": BINARY, "video/webm": BINARY}


#: ``?dry_run`` of every paid route (``edge.flow``).
_DRY_RUN_QUERY = {
    "dry_run": {
        "type": "string",
        "enum": ["true", "false", "1", "0"],
        "default": "false",
        "description": "true or 1: check the request and answer its price (a price_preview) without "
        "running, holding or charging anything.",
    }
}


def _paid(ok: Answer) -> dict[int, Answer]:
    """A paid route's answers: ``ok``, or a dry run's price preview (JSON), the task of
    ``Prefer: respond-async`` (202), and the errors."""
    body = ok.content.get("application/json")
    preview: Schema = (body, PricePreview) if isinstance(body, type) else PricePreview
    content = {**ok.content, "application/json": preview}
    return {
        200: Answer(f"{ok.description}; a price_preview for a dry run", content),
        202: Answer(
            "Queued as a task (Prefer: respond-async); poll GET /v1/tasks/{task_id}",
            {"application/json": TaskObject},
        ),
        **_PAID_ERRORS,
    }


def _tasks(ok: Answer, *errors: int) -> dict[int, Answer]:
    """A tasks route's answers, in seed 003's shapes."""
    meaning = {
        400: "a bad parameter, model or input",
        401: "no or an unknown credential",
        402: "insufficient credits",
        403: "premium required, or the session cookie without the session's X-CSRF-Token",
        404: "no such task (or another account's) or model",
        409: "the task has already finished",
        413: "the body is larger than the limit",
        429: "rate limited (Retry-After says when to try again)",
        500: "processing error",
        503: "maintenance, or the disk is too full for new work",
    }
    return {200: ok, **{code: Answer(meaning[code], {"application/json": TaskError}) for code in errors}}


_MUSIC = _paid(
    Answer(
        "The audio file; its description with ?response_format=json; progress events, then the "
        "description, with Accept: text/event-stream",
        {**_AUDIO_FILES, "application/json": MusicDescription, **_progress(MusicDescription)},
    )
)
_MUSIC_QUERY = {"response_format": {"type": "string", "enum": ["binary", "json"], "default": "binary"}}

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/images/generations",
        images.create_generation,
        "Generate images from a text prompt (OpenAI-compatible).",
        body=ImageGenerationRequest,
        responses=_paid(
            Answer(
                "The images (JSON), or the file itself with return_binary; progress events, then "
                "the images, with Accept: text/event-stream",
                {"application/json": ImagesResponse, **_IMAGE_FILES, **_progress(ImagesResponse)},
            )
        ),
    ),
    Route(
        "POST",
        "/v1/images/generations/batch",
        images.create_generation_batch,
        "Generate up to 5 image requests at once; the cost is the sum, reserved once.",
        body=BatchImageGenerationRequest,
        responses=_paid(_ok("Each request's images or its error, in order", json=BatchImagesResponse)),
    ),
    Route(
        "POST",
        "/v1/images/edits",
        images.create_edit,
        "Edit 1-4 images guided by a prompt (FLUX.2-klein); JSON or OpenAI's multipart form.",
        body=ImageEditRequest,
        form=ImageEditForm,
        files=("image", "image[]", "mask"),
        responses=_paid(
            Answer(
                "The images (JSON), or the file itself with return_binary; progress events, then "
                "the images, with Accept: text/event-stream",
                {"application/json": ImagesResponse, **_IMAGE_FILES, **_progress(ImagesResponse)},
            )
        ),
    ),
    Route(
        "POST",
        "/v1/images/segmentations",
        segmentation.segment_image,
        "Segment an image by a text prompt and/or points (SAM3). Answers segmented_image.png: the "
        "object on transparency (output=mask: a grey mask), the best candidate; every candidate is "
        "stored and listed in X-Mask-Candidates, or returned as JSON with Accept: application/json.",
        form=SegmentationForm,
        files=("file",),
        responses=_paid(
            Answer(
                "segmented_image.png, or every candidate as JSON (Accept: application/json)",
                {"image/png": BINARY, "application/json": SegmentationResponse},
            )
        ),
    ),
    Route(
        "POST",
        "/v1/images/remove-background",
        segmentation.remove_image_background,
        "Keep the object a prompt names; answers background_removed.png, RGBA, the input's size.",
        form=BackgroundRemovalForm,
        files=("file",),
        responses=_paid(_ok("background_removed.png", image_png=BINARY)),
    ),
    Route(
        "POST",
        "/v1/videos/remove-background",
        segmentation.remove_video_background,
        "Remove a video's background frame by frame; answers background_removed_video.webm (VP9 with "
        "alpha), same size and rate, no audio. 0.25 credits per frame where the object was found "
        "(X-Frames-Processed, X-Frames-Charged).",
        form=BackgroundRemovalForm,
        files=("file",),
        responses=_paid(_ok("background_removed_video.webm", video_webm=BINARY))
        | {413: _error("invalid_request_error: the video is larger than KILN_MAX_VIDEO_BYTES")},
    ),
    Route(
        "POST",
        "/v1/images/upscale",
        upscale.upscale_image,
        "Upscale an image: realesrgan_2x, realesrgan_4x, realesrgan_4x_anime (real Real-ESRGAN weights), "
        "swin2sr or lanczos; priced by method and output pixels.",
        body=UpscaleRequest,
        responses=_paid(_ok(json=UpscaleResponse)),
    ),
    Route(
        "POST",
        "/v1/chat/completions",
        chat.create_chat_completion,
        "Chat with vision (OpenAI's schema; stream: true for server-sent events). Premium only, free.",
        body=ChatCompletionRequest,
        responses=_paid(
            Answer(
                "A chat.completion, or chat.completion.chunk events then [DONE] with stream: true",
                {"application/json": ChatCompletion, "text/event-stream": CHAT_EVENTS},
            )
        ),
    ),
    Route(
        "POST",
        "/v1/audio/speech",
        audio.create_speech,
        "Speak a text (OpenAI's audio.speech): Piper's real 'joe' voice; wav and pcm stream as produced.",
        body=SpeechRequest,
        responses=_paid(
            Answer("The speech in response_format (wav and pcm streamed as produced)", _AUDIO_FILES)
        ),
    ),
    Route(
        "POST",
        "/v1/audio/clone",
        audio.clone_voice,
        "Clone a voice with Qwen3-TTS from reference audio and its transcript; a WAV file "
        "(cloned_voice.wav), streamed as it is synthesized with stream: true and stored for Range "
        "requests at Content-Location. 1 credit, premium free.",
        body=VoiceCloneRequest,
        responses=_paid(_ok("cloned_voice.wav", audio_wav=BINARY)),
    ),
    Route(
        "GET",
        "/v1/audio/clone/languages",
        audio.clone_languages,
        "The languages /v1/audio/clone speaks (from the loaded voice-cloning model).",
        authenticated=False,
        responses={
            200: _ok(json=CloneLanguages),
            500: _error("processing_error: the tts service is unreachable"),
        },
    ),
    Route(
        "POST",
        "/v1/music/generate",
        music.generate,
        "Generate music from a prompt (ACE-Step 1.5): lyrics, bpm, key_scale, time_signature, "
        "vocal_language, duration, instrumental, audio_format, seed. Answers the audio file, or JSON "
        "with its media URL with ?response_format=json. 1 credit, premium free.",
        body=MusicGenerateRequest,
        responses=_MUSIC,
        query=_MUSIC_QUERY,
    ),
    Route(
        "POST",
        "/v1/music/cover",
        music.cover,
        "Re-create a song (base64 'audio' in JSON, or an 'audio' file in a multipart form) in the style "
        "of 'prompt'; audio_cover_strength 0-1; the output keeps the source's duration. 1 credit.",
        body=MusicCoverRequest,
        form=MusicCoverRequest,
        files=("audio",),
        responses=_MUSIC,
        query=_MUSIC_QUERY,
    ),
    Route(
        "POST",
        "/v1/music/repaint",
        music.repaint,
        "Regenerate the region [start, end) seconds of a song ('audio' as for cover); outside the "
        "region the samples are kept exactly (20 ms crossfades inside the region). 1 credit.",
        body=MusicRepaintRequest,
        form=MusicRepaintRequest,
        files=("audio",),
        responses=_MUSIC,
        query=_MUSIC_QUERY,
    ),
    Route(
        "POST",
        "/v1/images/img2video",
        video.create_video,
        "Animate an image (multipart: 'image' file, prompt, negative_prompt, num_frames, num_steps, "
        "resolution 480p/720p/1080p, use_ode, seed): an H.264 MP4 in the media store, described in the "
        "JSON answer and added to the caller's video library. 1 credit, premium free.",
        form=ImageToVideoForm,
        files=("image",),
        responses=_paid(
            Answer(
                "The video's description; progress events with Accept: text/event-stream",
                {"application/json": GeneratedVideo, **_progress(GeneratedVideo)},
            )
        ),
    ),
    Route(
        "GET",
        "/v1/images/user-videos",
        video.list_user_videos,
        "The caller's own videos: limit (1-100, 20), offset, sortBy (newest, oldest or a field), "
        "sortOrder (asc, desc); with the total count. Free.",
        query={
            "limit": {"type": "integer", "minimum": 1, "maximum": video.MAX_PAGE, "default": 20},
            "offset": {"type": "integer", "minimum": 0, "maximum": video.MAX_OFFSET, "default": 0},
            "sortBy": {"type": "string", "enum": list(video.SORTS), "default": "newest"},
            "sortOrder": {"type": "string", "enum": ["asc", "desc"]},
        },
        responses={
            200: _ok(json=VideoList),
            400: _error("invalid_request_error: bad paging or sorting"),
            401: _error("authentication_error"),
            500: _error("processing_error"),
            503: _error("maintenance_mode"),
        },
    ),
    Route(
        "POST",
        "/v1/tasks",
        tasks.create_task,
        "Queue any paid request as a task (seed 003): {model, input, callback_url, dry_run, operation}; "
        "answers {code, success, data: {task_id, status}} (with dry_run: the price).",
        body=TaskCreateRequest,
        responses=_tasks(_ok(json=TaskEnvelope), 400, 401, 402, 403, 404, 413, 429, 500, 503),
    ),
    Route(
        "GET",
        "/v1/tasks",
        tasks.list_tasks,
        "The caller's tasks, newest first: status, limit (1-100, 20), page_token.",
        query={
            "status": {
                "type": "string",
                "enum": ["pending", "processing", "completed", "failed", "cancelled"],
            },
            "limit": {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
            "page_token": {"type": "string", "maxLength": 256},
        },
        responses=_tasks(_ok(json=TaskEnvelope), 400, 401, 500, 503),
    ),
    Route(
        "GET",
        "/v1/tasks/{task_id}",
        tasks.get_task,
        "One of the caller's tasks: status, progress, output or error, times, credits, webhook state.",
        responses=_tasks(_ok(json=TaskEnvelope), 401, 404, 500, 503),
    ),
    Route(
        "POST",
        "/v1/tasks/{task_id}/cancel",
        tasks.cancel_task,
        "Cancel a pending or running task (its hold is released); a finished one is a 409.",
        responses=_tasks(_ok(json=TaskEnvelope), 401, 403, 404, 409, 500, 503),
    ),
    Route(
        "GET",
        "/v1/audio/voices",
        audio.list_voices,
        "The voices /v1/audio/speech speaks with.",
        authenticated=False,
        responses={200: _ok(json=VoiceList)},
    ),
    Route(
        "GET",
        "/v1/images/styles",
        images.list_styles,
        "The style presets that `style_preset` accepts.",
        authenticated=False,
        responses={200: _ok(json=StyleList)},
    ),
    Route(
        "GET",
        "/v1/media/{media_id}",
        media.get_media,
        "Fetch a stored media file (public, cacheable, conditional GET).",
        authenticated=False,
        responses={
            200: Answer("The file", _MEDIA_FILES),
            206: Answer("The requested Range of the file", _MEDIA_FILES),
            304: Answer("Not modified (If-None-Match / If-Modified-Since)"),
            307: Answer("A presigned URL in Location (S3 media store, KILN_MEDIA_S3_REDIRECT)"),
            404: _error("not_found_error"),
            416: Answer("Range not satisfiable"),
        },
    ),
    Route(
        "GET",
        "/v1/models",
        system.list_models,
        "List models with aliases, limits, defaults and price formula.",
        authenticated=False,
        responses={200: _ok(json=ModelList)},
    ),
    Route(
        "GET",
        "/v1/account",
        system.get_account,
        "The caller's account and balance (authenticated, free).",
        responses={
            200: _ok(json=Account),
            401: _error("authentication_error"),
            500: _error("processing_error"),
            503: _error("maintenance_mode"),
        },
    ),
    Route(
        "POST",
        "/v1/session",
        session.sign_in,
        "Sign in with a user name and password (JSON): sets the HttpOnly session cookie kiln_session "
        "and answers the account, the CSRF token that state-changing requests with the cookie send "
        "in X-CSRF-Token, and the expiry. Wrong passwords are rate limited per name and address.",
        body=session.SignInRequest,
        authenticated=False,
        responses={
            200: _ok("Signed in; the cookie is set", json=session.SessionInfo),
            400: _error("invalid_request_error: not a JSON body with name and password"),
            401: _error("authentication_error: wrong user name or password (the same for every failure)"),
            408: _error("invalid_request_error: the request body arrived too slowly"),
            413: _error("invalid_request_error: the body is larger than the limit"),
            429: _error("rate_limit_error: too many failed sign-ins for this name or address"),
            500: _error("processing_error"),
            503: _error("maintenance_mode"),
        },
    ),
    Route(
        "GET",
        "/v1/session",
        session.get_session,
        "The signed-in user, account, CSRF token and expiry of the session cookie.",
        authenticated=False,
        security=("Session",),
        responses={
            200: _ok(json=session.SessionInfo),
            401: _error("authentication_error: no session cookie, or an ended session"),
            500: _error("processing_error"),
            503: _error("maintenance_mode"),
        },
    ),
    Route(
        "DELETE",
        "/v1/session",
        session.sign_out,
        "Sign out: revokes the session and clears the cookie (X-CSRF-Token required).",
        authenticated=False,
        security=("Session",),
        responses={
            200: _ok(json=session.SignedOut),
            401: _error("authentication_error: no session cookie"),
            403: _error("authentication_error: no or a wrong X-CSRF-Token"),
            500: _error("processing_error"),
        },
    ),
    Route(
        "GET",
        "/",
        playground.index,
        "The playground: a page per capability in the browser (sign in with a user's password).",
        authenticated=False,
        responses={200: _ok("The playground's page", text_html={"type": "string"})},
    ),
    Route(
        "GET",
        "/playground/{name}",
        playground.asset,
        "One of the playground's scripts, style sheets or icons (edge/playground/).",
        authenticated=False,
        responses={
            200: Answer(
                "The file",
                {kind: {"type": "string"} for kind in sorted(set(playground.CONTENT_TYPES.values()))},
            ),
            404: _error("not_found_error: no such playground file"),
        },
    ),
    Route(
        "GET",
        "/healthz",
        system.healthz,
        "Liveness.",
        authenticated=False,
        responses={200: _ok("Alive", json=Health)},
    ),
    Route(
        "GET",
        "/readyz",
        system.readyz,
        "Readiness: every service reachable and serving, and each model's load state.",
        authenticated=False,
        responses={
            200: _ok("Ready", json=Readiness),
            503: Answer("Not ready", {"application/json": Readiness}),
        },
    ),
    Route(
        "GET",
        "/metrics",
        get_metrics,
        "The edge's metrics in the Prometheus text format; only with KILN_METRICS_PUBLIC=true.",
        authenticated=False,
        responses={
            200: _ok("The metrics (text format 0.0.4)", text_plain={"type": "string"}),
            404: _error("not_found_error: metrics are not public (KILN_METRICS_PUBLIC)"),
        },
    ),
)


def _schema(schema: Schema, schemas: dict[str, Any]) -> dict[str, Any]:
    """A body's schema for the document: a model becomes a ``$ref`` (its definitions go into
    ``schemas``); server-sent events, the schema of one event (``data`` is JSON of one of the
    models: ``contentMediaType`` / ``contentSchema``); a JSON schema is used as it is."""
    if isinstance(schema, EventStream):
        payload: dict[str, Any] = {
            "type": "string",
            "contentMediaType": "application/json",
            "contentSchema": {"anyOf": [_schema(model, schemas) for model in schema.data]},
        }
        event: dict[str, Any] = {
            "type": "object",
            "required": ["data"],
            "properties": {"data": {"anyOf": [{"const": "[DONE]"}, payload]} if schema.done else payload},
        }
        if schema.events:
            event["properties"]["event"] = {"enum": list(schema.events)}
        return event
    if isinstance(schema, tuple):
        return {"anyOf": [_schema(model, schemas) for model in schema]}
    if not isinstance(schema, type):
        return dict(schema)
    body = schema.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
    schemas.update(body.pop("$defs", {}))
    schemas[schema.__name__] = body
    return {"$ref": f"#/components/schemas/{schema.__name__}"}


def _responses(route: Route, schemas: dict[str, Any]) -> dict[str, Any]:
    return {
        str(code): {"description": answer.description}
        | (
            {"content": {media: {"schema": _schema(body, schemas)} for media, body in answer.content.items()}}
            if answer.content
            else {}
        )
        for code, answer in sorted(route.responses.items())
    }


def _parameters(route: Route) -> list[dict[str, Any]]:
    parameters = [
        {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
        for name in route.path.replace("}", "{").split("{")[1::2]
    ]
    query = {**route.query, **(_DRY_RUN_QUERY if route.paid else {})}
    parameters += [
        {"name": name, "in": "query", "required": False, "schema": dict(schema)}
        for name, schema in query.items()
    ]
    return parameters


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for every route: request bodies from the request models, every status
    each route answers with its body (response models, files and event streams)."""
    schemas: dict[str, Any] = {}
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "responses": _responses(route, schemas),
        }
        if parameters := _parameters(route):
            operation["parameters"] = parameters
        content: dict[str, Any] = {}
        for media_type, model in (("application/json", route.body), ("multipart/form-data", route.form)):
            if model is None:
                continue
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            name = model.__name__
            if media_type == "multipart/form-data":
                schema["properties"] = dict(schema["properties"])
                for file in route.files:
                    schema["properties"][file] = BINARY
                if route.body is model:  # one model for both: the form's files are binary, not base64
                    name += "Form"
            schemas[name] = schema
            content[media_type] = {"schema": {"$ref": f"#/components/schemas/{name}"}}
        if content:
            operation["requestBody"] = {"required": True, "content": content}
        if route.security:
            operation["security"] = [{name: []} for name in route.security]
        elif route.authenticated:
            operation["security"] = [{"ApiKey": []}, {"Bearer": []}, {"Session": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    paths["/openapi.json"] = {
        "get": {
            "summary": "This document.",
            "operationId": "openapi",
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Kiln",
            "version": "1",
            "description": "Self-hosted, OpenAI-compatible generation API.",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
                "Bearer": {"type": "http", "scheme": "bearer"},
                "Session": {
                    "type": "apiKey",
                    "in": "cookie",
                    "name": session.SESSION_COOKIE,
                    "description": "The session of POST /v1/session; a POST, PUT, PATCH or DELETE with "
                    "it also sends the session's CSRF token in X-CSRF-Token.",
                },
            },
        },
    }


def setup_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler, expect_handler=expect_continue)
    document = openapi_document()

    async def openapi(request: web.Request) -> web.Response:
        return json_response(document)

    app.router.add_get("/openapi.json", openapi)
