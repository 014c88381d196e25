"""The route table: the router and the OpenAPI document are both built from it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from edge.handlers import audio, chat, images, media, music, segmentation, system, upscale, video
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
    UpscaleRequest,
    VoiceCloneRequest,
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


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
    responses: dict[int, str] = field(default_factory=dict)


_PAID = {
    200: "Success",
    400: "invalid_request_error",
    401: "authentication_error",
    402: "insufficient_credits",
    403: "premium_required",
    413: "Request body too large",
    500: "processing_error",
    503: "maintenance_mode",
}

ROUTES: tuple[Route, ...] = (
    Route(
        "POST",
        "/v1/images/generations",
        images.create_generation,
        "Generate images from a text prompt (OpenAI-compatible).",
        body=ImageGenerationRequest,
        responses=_PAID,
    ),
    Route(
        "POST",
        "/v1/images/generations/batch",
        images.create_generation_batch,
        "Generate up to 5 image requests at once; the cost is the sum, reserved once.",
        body=BatchImageGenerationRequest,
        responses=_PAID,
    ),
    Route(
        "POST",
        "/v1/images/edits",
        images.create_edit,
        "Edit 1-4 images guided by a prompt (FLUX.2-klein); JSON or OpenAI's multipart form.",
        body=ImageEditRequest,
        form=ImageEditForm,
        files=("image", "image[]", "mask"),
        responses=_PAID,
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
        responses=_PAID,
    ),
    Route(
        "POST",
        "/v1/images/remove-background",
        segmentation.remove_image_background,
        "Keep the object a prompt names; answers background_removed.png, RGBA, the input's size.",
        form=BackgroundRemovalForm,
        files=("file",),
        responses=_PAID,
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
        responses={**_PAID, 413: "Video larger than KILN_MAX_VIDEO_BYTES"},
    ),
    Route(
        "POST",
        "/v1/images/upscale",
        upscale.upscale_image,
        "Upscale an image: realesrgan_2x, realesrgan_4x, realesrgan_4x_anime (real Real-ESRGAN weights), "
        "swin2sr or lanczos; priced by method and output pixels.",
        body=UpscaleRequest,
        responses=_PAID,
    ),
    Route(
        "POST",
        "/v1/chat/completions",
        chat.create_chat_completion,
        "Chat with vision (OpenAI's schema; stream: true for server-sent events). Premium only, free.",
        body=ChatCompletionRequest,
        responses=_PAID,
    ),
    Route(
        "POST",
        "/v1/audio/speech",
        audio.create_speech,
        "Speak a text (OpenAI's audio.speech): Piper's real 'joe' voice; wav and pcm stream as produced.",
        body=SpeechRequest,
        responses=_PAID,
    ),
    Route(
        "POST",
        "/v1/audio/clone",
        audio.clone_voice,
        "Clone a voice with Qwen3-TTS from reference audio and its transcript; a WAV file "
        "(cloned_voice.wav), streamed as it is synthesized with stream: true and stored for Range "
        "requests at Content-Location. 1 credit, premium free.",
        body=VoiceCloneRequest,
        responses=_PAID,
    ),
    Route(
        "GET",
        "/v1/audio/clone/languages",
        audio.clone_languages,
        "The languages /v1/audio/clone speaks (from the loaded voice-cloning model).",
        authenticated=False,
        responses={200: "Success"},
    ),
    Route(
        "POST",
        "/v1/music/generate",
        music.generate,
        "Generate music from a prompt (ACE-Step 1.5): lyrics, bpm, key_scale, time_signature, "
        "vocal_language, duration, instrumental, audio_format, seed. Answers the audio file, or JSON "
        "with its media URL with ?response_format=json. 1 credit, premium free.",
        body=MusicGenerateRequest,
        responses=_PAID,
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
        responses=_PAID,
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
        responses=_PAID,
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
        responses=_PAID,
    ),
    Route(
        "GET",
        "/v1/images/user-videos",
        video.list_user_videos,
        "The caller's own videos: limit (1-100, 20), offset, sortBy (newest, oldest or a field), "
        "sortOrder (asc, desc); with the total count. Free.",
        responses={200: "Success", 400: "Bad parameters", 401: "Not authenticated"},
    ),
    Route(
        "GET",
        "/v1/audio/voices",
        audio.list_voices,
        "The voices /v1/audio/speech speaks with.",
        authenticated=False,
        responses={200: "Success"},
    ),
    Route(
        "GET",
        "/v1/images/styles",
        images.list_styles,
        "The style presets that `style_preset` accepts.",
        authenticated=False,
        responses={200: "Success"},
    ),
    Route(
        "GET",
        "/v1/media/{media_id}",
        media.get_media,
        "Fetch a stored media file (public, cacheable, conditional GET).",
        authenticated=False,
        responses={200: "The file", 304: "Not modified", 404: "not_found_error"},
    ),
    Route(
        "GET",
        "/v1/models",
        system.list_models,
        "List models with aliases, limits, defaults and price formula.",
        authenticated=False,
        responses={200: "Success"},
    ),
    Route(
        "GET",
        "/v1/account",
        system.get_account,
        "The caller's account and balance (authenticated, free).",
        responses={200: "Success", 401: "authentication_error", 503: "maintenance_mode"},
    ),
    Route("GET", "/healthz", system.healthz, "Liveness.", authenticated=False, responses={200: "Alive"}),
    Route(
        "GET",
        "/readyz",
        system.readyz,
        "Readiness: billing and image_gen reachable and serving.",
        authenticated=False,
        responses={200: "Ready", 503: "Not ready"},
    ),
)


def openapi_document() -> dict[str, Any]:
    """OpenAPI 3.1 for every route, request bodies from the pydantic models."""
    schemas: dict[str, Any] = {
        "Error": {
            "type": "object",
            "properties": {
                "error": {
                    "type": "object",
                    "properties": {"message": {"type": "string"}, "type": {"type": "string"}},
                    "required": ["message", "type"],
                }
            },
        }
    }
    paths: dict[str, dict[str, Any]] = {}
    for route in ROUTES:
        operation: dict[str, Any] = {
            "summary": route.summary,
            "operationId": route.handler.__name__,
            "responses": {
                str(code): {"description": text}
                | (
                    {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
                    if code >= 400
                    else {}
                )
                for code, text in route.responses.items()
            },
        }
        if "{media_id}" in route.path:
            operation["parameters"] = [
                {"name": "media_id", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        content: dict[str, Any] = {}
        for media_type, model in (("application/json", route.body), ("multipart/form-data", route.form)):
            if model is None:
                continue
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            if media_type == "multipart/form-data":
                for name in route.files:
                    schema["properties"][name] = {"type": "string", "format": "binary"}
            schemas[model.__name__] = schema
            content[media_type] = {"schema": {"$ref": f"#/components/schemas/{model.__name__}"}}
        if content:
            operation["requestBody"] = {"required": True, "content": content}
        if route.authenticated:
            operation["security"] = [{"ApiKey": []}, {"Bearer": []}]
        paths.setdefault(route.path, {})[route.method.lower()] = operation
    paths["/openapi.json"] = {
        "get": {"summary": "This document.", "responses": {"200": {"description": "OK"}}}
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
            },
        },
    }


def setup_routes(app: web.Application) -> None:
    for route in ROUTES:
        app.router.add_route(route.method, route.path, route.handler)
    document = openapi_document()

    async def openapi(request: web.Request) -> web.Response:
        return json_response(document)

    app.router.add_get("/openapi.json", openapi)
