"""``kiln.tts.v1.TtsService``: text in, a stream of raw PCM out.

``Synthesize`` resolves the voice (a speech model id or alias; the pool's
default when empty), checks the text and speed (an
:class:`~services.common.errors.InvalidRequest`, INVALID_ARGUMENT, before
anything is streamed), then streams an :class:`AudioHeader` (sample rate,
mono), the 16-bit little-endian PCM of each sentence as Piper produces it (in
messages of at most :data:`MAX_PCM_MESSAGE_BYTES`), and a
:class:`SynthesisSummary`. Encoding to wav/mp3/... is the edge's job
(:func:`services.common.media.audio.encode_audio`). ``CloneVoice`` decodes the reference recording in a decode worker process
(:class:`~services.common.decoding.DecodePool`; :func:`~services.common.media.audio.decode_audio`: WAV, FLAC, MP3, Ogg; too large,
too long, empty or not audio is INVALID_ARGUMENT), checks the texts and the
language, then streams the same events as ``Synthesize`` from Qwen3-TTS
(:mod:`services.tts.cloning`). ``ListVoices`` lists every speech and
voice-cloning model of the registry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from kiln.tts.v1 import tts_service_pb2 as pb
from kiln.tts.v1 import tts_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidRequest
from services.common.media.audio import decode_audio
from services.common.registry import DEFAULT_CLONE_MODEL, VOICE_CLONE
from services.common.servicer import EngineServicer
from services.tts.cloning import CloneEngine, CloneRequest
from services.tts.engines import SPEECH, SpeechEngine, SpeechRequest, pcm_of, voice_info
from services.tts.rules import check_reference_duration

#: Full name of the service, for health and reflection.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TtsService"].full_name
#: Largest PCM payload of one stream message (a long sentence is split).
MAX_PCM_MESSAGE_BYTES = 256 * 1024


class TtsServicer(EngineServicer[SpeechEngine | CloneEngine], pb_grpc.TtsServiceServicer):
    """Speech synthesis over gRPC."""

    async def Synthesize(
        self, request: pb.SynthesizeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.SynthesizeResponse]:
        spec = self.registry.resolve(request.voice or None, SPEECH, self.pool.default)
        engine = self.pool.get(spec.id)
        if not isinstance(engine, SpeechEngine):
            raise InvalidRequest(f"'{spec.id}' is not a voice")
        speed = request.speed or 1.0
        engine.check(request.text, speed)
        yield pb.SynthesizeResponse(
            header=pb.AudioHeader(sample_rate=engine.sample_rate, channels=1, voice=spec.id)
        )
        chunks = pcm_of(engine.run(SpeechRequest(request.text, speed), request_id=request.request_id))
        async for event in _pcm_events(chunks, engine.sample_rate, pb.SynthesizeResponse):
            yield event

    async def CloneVoice(
        self, request: pb.CloneVoiceRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CloneVoiceResponse]:
        spec = self.registry.resolve(request.model or None, VOICE_CLONE, DEFAULT_CLONE_MODEL)
        engine = self.pool.get(spec.id)
        if not isinstance(engine, CloneEngine):
            raise InvalidRequest(f"'{spec.id}' is not a voice-cloning model")
        language = engine.check(request.text, request.ref_text, request.language)
        reference = await self.decoder.run(
            "'ref_audio'",
            decode_audio,
            request.ref_audio,
            max_seconds=self.settings.max_reference_audio_seconds,
            max_bytes=self.settings.max_reference_audio_bytes,
            field="ref_audio",
        )
        check_reference_duration(reference.duration)
        yield pb.CloneVoiceResponse(
            header=pb.AudioHeader(sample_rate=engine.sample_rate, channels=1, voice=spec.id)
        )
        clone = CloneRequest(
            text=request.text,
            ref_audio=reference.mono(),
            ref_rate=reference.sample_rate,
            ref_text=request.ref_text,
            language=language,
            seed=request.seed,
        )
        chunks = pcm_of(engine.run(clone, request_id=request.request_id))
        async for event in _pcm_events(chunks, engine.sample_rate, pb.CloneVoiceResponse):
            yield event

    async def ListVoices(
        self, request: pb.ListVoicesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListVoicesResponse:
        voices = []
        for spec in self.registry.for_capability(SPEECH):
            engine = self.pool.engines.get(spec.id)
            if isinstance(engine, SpeechEngine) and engine.ready:
                language, sample_rate = engine.language, engine.sample_rate
            else:
                try:
                    info = await asyncio.to_thread(voice_info, spec)
                except Exception:  # the voice is not installed: listed without details
                    language, sample_rate = str(spec.options.get("language", "")), 0
                else:
                    language, sample_rate = info.language, info.sample_rate
            voices.append(
                pb.Voice(id=spec.id, language=language, sample_rate=sample_rate, description=spec.description)
            )
        for spec in self.registry.for_capability(VOICE_CLONE):
            cloner = self.pool.engines.get(spec.id)
            ready = cloner if isinstance(cloner, CloneEngine) and cloner.ready else None
            voices.append(
                pb.Voice(
                    id=spec.id,
                    sample_rate=ready.sample_rate if ready else 0,
                    description=spec.description,
                    languages=ready.language_names() if ready else [],
                    cloning=True,
                )
            )
        return pb.ListVoicesResponse(voices=voices)


async def _pcm_events(chunks: AsyncIterator[bytes], sample_rate: int, message: Any) -> AsyncIterator[Any]:
    """``message`` events for a PCM stream: the chunks (split to fit a message), then a summary."""
    started = time.perf_counter()
    samples = 0
    async with aclosing(chunks):  # type: ignore[type-var]
        async for pcm in chunks:
            samples += len(pcm) // 2
            for offset in range(0, len(pcm), MAX_PCM_MESSAGE_BYTES):
                yield message(pcm=pcm[offset : offset + MAX_PCM_MESSAGE_BYTES])
    yield message(
        summary=pb.SynthesisSummary(
            samples=samples,
            duration_seconds=samples / sample_rate,
            synthesis_seconds=time.perf_counter() - started,
        )
    )
