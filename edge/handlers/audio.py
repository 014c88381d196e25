"""OpenAI's ``POST /v1/audio/speech``, ``GET /v1/audio/voices``, and the contract's
``POST /v1/audio/clone`` (with ``GET /v1/audio/clone/languages``).

The tts service streams 16-bit mono PCM as it is synthesised. ``wav`` and
``pcm`` answers are streamed to the client chunk by chunk as they arrive (the
WAV header says "length unknown", as streaming WAV writers do), one chunk
behind: the last chunk is written only once the charge is committed, so a
client that leaves before the end pays nothing and one that got it all has
paid; ``mp3``, ``opus``, ``aac`` and ``flac`` are encoded once the speech is
complete.

Voice cloning answers ``audio/wav`` (``cloned_voice.wav``). With ``stream``
the WAV goes out chunk by chunk as Qwen3-TTS decodes codec frames, and the
finished file (a WAV with its real length) is stored in the media store under
the id announced up front in ``Content-Location``, where it can be fetched
again with HTTP Range requests; without ``stream`` the whole file is sent
(and stored too). The reference recording is decoded and checked by the tts
service before anything is charged or sent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from aiohttp import web

from edge.flow import Charge, Done, Hold, MediaFile, billed, billed_stream, credential_from
from edge.forms import read_body
from edge.keys import MEDIA, REGISTRY, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.responses import json_response
from edge.schemas import SPEECH_MODELS, SpeechRequest, VoiceCloneRequest, decode_base64_file, parse_body
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.tts.v1 import tts_service_pb2 as tts_pb
from services.common.errors import InvalidRequest, KilnError, ProcessingError, quoted
from services.common.media.audio import encode_audio, wav_header
from services.common.money import format_credits
from services.common.registry import DEFAULT_CLONE_MODEL, SPEECH, VOICE_CLONE

log = logging.getLogger("kiln.edge")
STREAMED = {"wav": "audio/wav", "pcm": "audio/pcm"}
#: The contract's file name for cloned speech.
CLONE_DISPOSITION = 'attachment; filename="cloned_voice.wav"'


async def create_speech(request: web.Request) -> web.StreamResponse:
    credential_from(request)
    settings = request.app[SETTINGS]
    body = parse_body(SpeechRequest, await read_body(request))
    if body.model not in SPEECH_MODELS:
        raise InvalidRequest(
            f"Invalid model ID '{quoted(body.model)}'. Supported models: {', '.join(SPEECH_MODELS)}"
        )
    if not body.input.strip():
        raise InvalidRequest("'input' must not be empty")
    if len(body.input) > settings.max_speech_chars:
        raise InvalidRequest(f"'input' is longer than {settings.max_speech_chars} characters")
    registry = request.app[REGISTRY]
    voice = registry.get(body.voice)
    if voice is None or not voice.serves(SPEECH):
        names = ", ".join(
            name for spec in registry.for_capability(SPEECH) for name in (spec.id, *spec.aliases)
        )
        raise InvalidRequest(f"Invalid voice '{quoted(body.voice)}'. Supported voices: {names}")
    call = tts_pb.SynthesizeRequest(
        text=body.input, voice=voice.id, speed=body.speed, request_id=request[REQUEST_ID]
    )
    usage = [billing_pb.Usage(speech=billing_pb.SpeechUsage(model=voice.id))]
    tts = request.app[UPSTREAMS].tts

    if body.response_format in STREAMED:

        async def stream(hold: Hold) -> web.StreamResponse:
            async with contextlib.aclosing(tts.synthesize(call)) as events:
                rate = await _header(events)
                response, last = await _stream(request, events, rate, body.response_format, price(hold))
                return await _end_stream(request, response, last, lambda: hold.settle(usage))

        return await billed_stream(request, usage, stream, dry_run=body.dry_run)

    async def work(auth: billing_pb.AuthorizeResponse) -> Done[tuple[bytes, str]]:
        async with contextlib.aclosing(tts.synthesize(call)) as events:
            rate = await _header(events)
            pcm = b"".join([event.pcm async for event in events if event.HasField("pcm")])
        return Done(await asyncio.to_thread(encode_audio, pcm, rate, body.response_format), usage)

    async def answer(audio: tuple[bytes, str], charge: Charge) -> web.StreamResponse:
        data, mime = audio
        headers = {"X-Credits-Charged": format_credits(charge.charged)}
        return web.Response(body=data, content_type=mime, headers=headers)

    return await billed(request, usage, work, answer, dry_run=body.dry_run)


def price(hold: Hold) -> dict[str, str]:
    """A streamed answer's ``X-Credits-Charged``: the price billing held, which is what a
    stream that reaches its end is charged (the headers leave before the charge)."""
    return {"X-Credits-Charged": format_credits(hold.auth.reservation.amount_hundredths)}


async def _header(events: AsyncIterator[Any]) -> int:
    """The sample rate of the audio header the speech service sends first."""
    first = await anext(events)
    if not first.HasField("header"):
        raise ProcessingError("The speech service answered without an audio header")
    return int(first.header.sample_rate)


async def _stream(
    request: web.Request,
    events: AsyncIterator[Any],
    rate: int,
    fmt: str,
    headers: dict[str, str],
    sent: list[bytes] | None = None,
) -> tuple[web.StreamResponse, bytes | None]:
    """Sends the PCM events as they arrive (after a "length unknown" WAV header for wav),
    one chunk behind, appending each chunk to ``sent`` when given. Returns the response
    and the last chunk, which :func:`_end_stream` writes once the charge is committed
    (None: the speech service failed after the headers went out)."""
    response = web.StreamResponse(headers={**headers, "Content-Type": STREAMED[fmt]})
    await response.prepare(request)
    if fmt == "wav":
        await response.write(wav_header(rate))
    last = b""
    try:
        async for event in events:
            if event.HasField("pcm"):
                if sent is not None:
                    sent.append(event.pcm)
                if last:
                    await response.write(last)
                last = event.pcm
    except KilnError as err:
        log.warning("speech stream %s failed after its headers: %s", request[REQUEST_ID], err.message)
        return response, None
    return response, last


async def _end_stream(
    request: web.Request,
    response: web.StreamResponse,
    last: bytes | None,
    settle: Callable[[], Awaitable[int]],
) -> web.StreamResponse:
    """Charges (``settle``), then writes the last chunk and ends the answer. When the stream
    broke or the charge failed, the connection is cut instead: audio has no in-band error,
    and a chunked answer without its end tells the client it failed. Nothing is charged then
    (:func:`~edge.flow.billed_stream` releases the hold)."""
    if last is not None:
        try:
            await settle()
        except KilnError as err:
            log.warning("speech stream %s not charged: %s", request[REQUEST_ID], err.message)
        else:
            await response.write(last)
            await response.write_eof()
            return response
    if request.transport is not None:
        request.transport.close()
    return response


async def list_voices(request: web.Request) -> web.Response:
    """The voices ``/v1/audio/speech`` speaks with (OpenAI's voice names are aliases)."""
    registry = request.app[REGISTRY]
    voices = [
        {
            "id": spec.id,
            "aliases": list(spec.aliases),
            "language": spec.options.get("language", ""),
            "description": spec.description,
        }
        for spec in registry.for_capability(SPEECH)
    ]
    return json_response({"object": "list", "data": voices, "created": int(time.time())})


async def clone_voice(request: web.Request) -> web.StreamResponse:
    """``POST /v1/audio/clone``: the text in the reference recording's voice, as WAV."""
    credential_from(request)
    body = parse_body(VoiceCloneRequest, await read_body(request))
    ref_audio = decode_base64_file(body.ref_audio, "ref_audio")
    call = tts_pb.CloneVoiceRequest(
        text=body.text,
        ref_audio=ref_audio,
        ref_text=body.ref_text,
        language=body.language,
        seed=body.seed or 0,
        request_id=request[REQUEST_ID],
    )
    model = request.app[REGISTRY].resolve(None, VOICE_CLONE, DEFAULT_CLONE_MODEL)
    usage = [billing_pb.Usage(speech=billing_pb.SpeechUsage(model=model.id))]
    media_id = request.app[MEDIA].new_id()
    headers = {"Content-Disposition": CLONE_DISPOSITION, "Content-Location": f"/v1/media/{media_id}"}
    tts = request.app[UPSTREAMS].tts

    async def wav_file(pcm: list[bytes], rate: int) -> MediaFile:
        data, mime = await asyncio.to_thread(encode_audio, b"".join(pcm), rate, "wav")
        return MediaFile(data, mime, media_id)

    if body.stream:

        async def stream(hold: Hold) -> web.StreamResponse:
            async with contextlib.aclosing(tts.clone(call)) as events:
                rate = await _header(events)  # the service checks everything before its header
                pcm: list[bytes] = []
                response, last = await _stream(request, events, rate, "wav", headers | price(hold), sent=pcm)

                async def settle() -> int:  # the file is stored, then the charge committed
                    return await hold.settle(usage, files=[await wav_file(pcm, rate)])

                return await _end_stream(request, response, last, settle)

        return await billed_stream(request, usage, stream, dry_run=body.dry_run)

    async def work(auth: billing_pb.AuthorizeResponse) -> Done[MediaFile]:
        async with contextlib.aclosing(tts.clone(call)) as events:
            rate = await _header(events)
            pcm = [event.pcm async for event in events if event.HasField("pcm")]
        file = await wav_file(pcm, rate)
        return Done(file, usage, files=[file])

    async def answer(file: MediaFile, charge: Charge) -> web.StreamResponse:
        charged = {"X-Credits-Charged": format_credits(charge.charged)}
        return web.Response(body=file.data, content_type=file.mime_type, headers=headers | charged)

    return await billed(request, usage, work, answer, dry_run=body.dry_run)


async def clone_languages(request: web.Request) -> web.Response:
    """The languages ``/v1/audio/clone`` speaks, as the loaded model reports them."""
    reply = await request.app[UPSTREAMS].tts.voices()
    models = [
        {"id": voice.id, "languages": list(voice.languages), "sample_rate": voice.sample_rate}
        for voice in reply.voices
        if voice.cloning
    ]
    return json_response({"object": "list", "data": models, "default_language": "English"})
