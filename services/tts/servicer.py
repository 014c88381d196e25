"""``kiln.tts.v1.TtsService``: text in, a stream of raw PCM out.

``Synthesize`` resolves the voice (a speech model id or alias; the pool's
default when empty), checks the text and speed (an
:class:`~services.common.errors.InvalidRequest`, INVALID_ARGUMENT, before
anything is streamed), then streams an :class:`AudioHeader` (sample rate,
mono), the 16-bit little-endian PCM of each sentence as Piper produces it (in
messages of at most :data:`MAX_PCM_MESSAGE_BYTES`), and a
:class:`SynthesisSummary`. Encoding to wav/mp3/... is the edge's job
(:func:`services.common.media.encode_audio`). ``ListVoices`` lists every
speech model of the registry.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc

from kiln.tts.v1 import tts_service_pb2 as pb
from kiln.tts.v1 import tts_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool
from services.common.errors import InvalidRequest
from services.common.registry import Registry
from services.tts.engines import SPEECH, SpeechEngine, voice_info

#: Full name of the service, for health and reflection.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["TtsService"].full_name
#: Largest PCM payload of one stream message (a long sentence is split).
MAX_PCM_MESSAGE_BYTES = 256 * 1024


class TtsServicer(pb_grpc.TtsServiceServicer):
    """Speech synthesis over gRPC."""

    def __init__(self, *, registry: Registry, pool: EnginePool) -> None:
        self.registry = registry
        self.pool = pool

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
        started = time.perf_counter()
        samples = 0
        chunks = engine.synthesize(request.text, speed, request_id=request.request_id)
        async with aclosing(chunks):
            async for pcm in chunks:
                samples += len(pcm) // 2
                for offset in range(0, len(pcm), MAX_PCM_MESSAGE_BYTES):
                    yield pb.SynthesizeResponse(pcm=pcm[offset : offset + MAX_PCM_MESSAGE_BYTES])
        yield pb.SynthesizeResponse(
            summary=pb.SynthesisSummary(
                samples=samples,
                duration_seconds=samples / engine.sample_rate,
                synthesis_seconds=time.perf_counter() - started,
            )
        )

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
        return pb.ListVoicesResponse(voices=voices)
