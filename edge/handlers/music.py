"""``POST /v1/music/generate``, ``/v1/music/cover`` and ``/v1/music/repaint`` (ACE-Step 1.5).

The music service streams progress, then the result (rate, channels, seed,
timing), then 16-bit PCM; the edge encodes it as ``audio_format`` (wav, mp3,
flac, opus, aac), stores the file in the media store and answers with the
audio itself (``Content-Type`` of the format, ``Content-Disposition:
attachment; filename="generated_music.<ext>"``, ``X-Seed``,
``Content-Location: /v1/media/<id>``), or, with ``?response_format=json``, a
JSON body describing the stored file (id, url, format, duration, rate,
channels, seed, model, timing); with ``Accept: text/event-stream``,
server-sent ``progress`` events per denoising step, then ``result`` (that
description, after the charge) or ``error``. Cover and repaint take the source song as
base64 ``audio`` in a JSON body or as an ``audio`` file in a multipart form
(the other fields as form fields). Every check happens before any audio is
produced, so a bad request is a 400 that costs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any, TypeVar

from aiohttp import web

from edge.flow import Charge, Done, MediaFile, billed, credential_from
from edge.forms import FORM_TYPES, read_body, read_upload_form
from edge.handlers.images import media_base, timing_entry
from edge.keys import MEDIA, REGISTRY, REQUEST_ID, UPSTREAMS
from edge.responses import ProgressEvents, json_response
from edge.schemas import (
    MusicCoverRequest,
    MusicGenerateRequest,
    MusicOptions,
    MusicRepaintRequest,
    decode_base64_file,
    parse_body,
    parse_form,
)
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.music.v1 import music_service_pb2 as music_pb
from services.common.errors import InvalidRequest, KilnError, ProcessingError, envelope, quoted
from services.common.media.audio import encode_audio
from services.common.money import format_credits
from services.common.registry import DEFAULT_MUSIC_MODEL, MUSIC

#: The requests that carry a source song.
SourceT = TypeVar("SourceT", MusicCoverRequest, MusicRepaintRequest)


async def generate(request: web.Request) -> web.StreamResponse:
    credential_from(request)
    body = parse_body(MusicGenerateRequest, await read_body(request))
    call = music_pb.GenerateMusicRequest(**_common(request, body))
    if body.duration is not None:
        call.duration_seconds = body.duration
    return await _run(request, body, call.model, lambda: request.app[UPSTREAMS].music.generate(call))


async def cover(request: web.Request) -> web.StreamResponse:
    body, audio = await _with_source(request, MusicCoverRequest)
    call = music_pb.CoverMusicRequest(source_audio=audio, **_common(request, body))
    if body.audio_cover_strength is not None:
        call.audio_cover_strength = body.audio_cover_strength
    return await _run(request, body, call.model, lambda: request.app[UPSTREAMS].music.cover(call))


async def repaint(request: web.Request) -> web.StreamResponse:
    body, audio = await _with_source(request, MusicRepaintRequest)
    call = music_pb.RepaintMusicRequest(
        source_audio=audio, start_seconds=body.start, **_common(request, body)
    )
    if body.end is not None:
        call.end_seconds = body.end
    return await _run(request, body, call.model, lambda: request.app[UPSTREAMS].music.repaint(call))


async def _with_source(request: web.Request, model: type[SourceT]) -> tuple[SourceT, bytes]:
    """The request's fields and source song: multipart (``audio`` file) or JSON (base64 ``audio``)."""
    credential_from(request)
    if request.content_type in FORM_TYPES:
        audio, fields = await read_upload_form(
            request, field="audio", what="the source song as an audio file"
        )
        return parse_form(model, fields), audio
    body = parse_body(model, await read_body(request))
    if not body.audio:
        raise InvalidRequest("Missing required parameter: 'audio' (the source song, base64 or a file upload)")
    return body, decode_base64_file(body.audio, "audio")


def _common(request: web.Request, body: MusicOptions) -> dict[str, Any]:
    """The request fields every music RPC shares."""
    fields: dict[str, Any] = {
        "model": request.app[REGISTRY].resolve(body.model, MUSIC, DEFAULT_MUSIC_MODEL).id,
        "prompt": body.prompt,
        "lyrics": body.lyrics,
        "key_scale": body.key_scale,
        "time_signature": body.time_signature,
        "vocal_language": body.vocal_language,
        "instrumental": body.instrumental,
        "request_id": request[REQUEST_ID],
    }
    for name in ("bpm", "seed", "num_inference_steps"):
        value = getattr(body, name)
        if value is not None:
            fields[name] = value
    return fields


async def _run(
    request: web.Request,
    body: MusicOptions,
    model: str,
    start: Callable[[], AsyncGenerator[Any]],
) -> web.StreamResponse:
    started = time.perf_counter()
    as_json = request.query.get("response_format", "binary")
    if as_json not in ("binary", "json"):
        raise InvalidRequest(
            f"Invalid value for 'response_format': '{quoted(as_json)}' (use 'binary' or 'json')"
        )
    usage = [billing_pb.Usage(music=billing_pb.MusicUsage(model=model))]

    progress = ProgressEvents(request)  # Accept: text/event-stream: progress, then the description
    media_id = request.app[MEDIA].new_id()

    async def work(auth: billing_pb.AuthorizeResponse) -> Done[tuple[music_pb.GeneratedMusic, MediaFile]]:
        result: music_pb.GeneratedMusic | None = None
        pcm: list[bytes] = []
        events = start()
        async with contextlib.aclosing(events):
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    await progress.step(event.progress.step, event.progress.total_steps)
                elif kind == "result":
                    result = event.result
                elif kind == "pcm":
                    pcm.append(event.pcm)
        if result is None:
            raise ProcessingError("The music service answered without a result")
        data, mime = await asyncio.to_thread(
            encode_audio, b"".join(pcm), result.sample_rate, body.audio_format, channels=result.channels
        )
        file = MediaFile(data, mime, media_id)
        return Done((result, file), usage, files=[file])

    async def answer(done: tuple[music_pb.GeneratedMusic, MediaFile], charge: Charge) -> web.StreamResponse:
        result, file = done
        description: dict[str, Any] = {
            "id": media_id,
            "url": f"{media_base(request)}/v1/media/{media_id}",
            "audio_format": body.audio_format,
            "content_type": file.mime_type,
            "duration": result.duration_seconds,
            "sample_rate": result.sample_rate,
            "channels": result.channels,
            "seed": result.seed,
            "model": result.model,
            "num_inference_steps": result.num_inference_steps,
            "credits_charged": format_credits(charge.charged),
            "timing": timing_entry(result.timing, charge.store_seconds, started),
        }
        if progress.wanted:
            return await progress.finish(description)
        if as_json == "json":
            return json_response(description, headers={"X-Credits-Charged": description["credits_charged"]})
        return web.Response(
            body=file.data,
            content_type=file.mime_type,
            headers={
                "Content-Disposition": f'attachment; filename="generated_music.{body.audio_format}"',
                "Content-Location": f"/v1/media/{media_id}",
                "X-Seed": str(result.seed),
                "X-Credits-Charged": format_credits(charge.charged),
            },
        )

    try:
        return await billed(request, usage, work, answer, streamed=progress.wanted, dry_run=body.dry_run)
    except KilnError as err:
        ended = await progress.fail(envelope(err.message, err.error_type))
        if ended is None:
            raise
        return ended
