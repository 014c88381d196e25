"""``kiln.music.v1.MusicService``: protobuf in, checked music requests, engine, PCM out.

The servicer does no model work. Each generating RPC resolves the model (an
id or alias of capability ``music``; the pool's default when empty), checks
the text conditions with :func:`~services.music.rules.music_conditions` and
the cheap numeric rules before anything else, then (cover, repaint) decodes
the untrusted source through :func:`services.common.media.audio.decode_audio` in a
decode worker process (:class:`~services.common.decoding.DecodePool`; resampled
to the model's rate as it decodes; byte limit ``max_input_audio_bytes``, duration limit the
model's ``max_duration_seconds``) and converts it to the model's rate and
channels. Every bad input is an :class:`~services.common.errors.InvalidRequest`
(INVALID_ARGUMENT) raised before the first message of the stream.

The stream relays the engine's events: one ``progress`` per denoising step,
then one ``result`` (format, seed, timing, ``pcm_bytes``), then the PCM in
``pcm`` messages of at most :data:`MAX_PCM_MESSAGE_BYTES`. Cancelling the call
closes the engine's iterator, which stops the pipeline at its next step.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
import numpy as np

from kiln.common.v1 import media_pb2
from kiln.music.v1 import music_service_pb2 as pb
from kiln.music.v1 import music_service_pb2_grpc as pb_grpc
from services.common.media.audio import decode_audio
from services.common.registry import MUSIC
from services.common.runner import Progress
from services.common.servicer import EngineServicer
from services.music.engines import MusicEngine, MusicRequest, MusicResult, TaskType, conform_audio
from services.music.rules import (
    MusicConditions,
    check_cover_strength,
    check_region_bounds,
    max_duration_seconds,
    music_conditions,
)

#: Full name of the service, for health and reflection.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["MusicService"].full_name
#: Largest PCM payload of one stream message.
MAX_PCM_MESSAGE_BYTES = 1024 * 1024
#: Largest accepted source song file (until ``settings.max_input_audio_bytes`` exists).
DEFAULT_MAX_INPUT_AUDIO_BYTES = 50 * 1024 * 1024

ResponseT = TypeVar("ResponseT", pb.GenerateMusicResponse, pb.CoverMusicResponse, pb.RepaintMusicResponse)


def _optional(message: Any, field: str) -> Any:
    return getattr(message, field) if message.HasField(field) else None


def _conditions(request: Any, max_prompt_chars: int) -> MusicConditions:
    return music_conditions(
        prompt=request.prompt,
        lyrics=request.lyrics,
        bpm=_optional(request, "bpm"),
        key_scale=request.key_scale,
        time_signature=request.time_signature,
        vocal_language=request.vocal_language,
        instrumental=request.instrumental,
        max_prompt_chars=max_prompt_chars,
    )


def _result_to_proto(result: MusicResult) -> pb.GeneratedMusic:
    return pb.GeneratedMusic(
        sample_rate=result.sample_rate,
        channels=result.channels,
        samples=result.samples,
        duration_seconds=result.duration_seconds,
        pcm_bytes=len(result.pcm),
        seed=result.seed,
        model=result.model,
        num_inference_steps=result.steps,
        timing=media_pb2.Timing(
            queue_ms=result.queue_ms, inference_ms=result.inference_ms, encode_ms=result.encode_ms
        ),
    )


class MusicServicer(EngineServicer[MusicEngine], pb_grpc.MusicServiceServicer):
    """Music generation, covers and repaints over gRPC."""

    async def GenerateMusic(
        self, request: pb.GenerateMusicRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateMusicResponse]:
        engine = self._engine(request.model)
        music = MusicRequest(
            task=TaskType.TEXT2MUSIC,
            conditions=_conditions(request, self.settings.max_prompt_chars),
            duration_seconds=_optional(request, "duration_seconds"),
            seed=_optional(request, "seed"),
            steps=_optional(request, "num_inference_steps"),
        )
        async for message in self._stream(engine, music, request.request_id, pb.GenerateMusicResponse):
            yield message

    async def CoverMusic(
        self, request: pb.CoverMusicRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.CoverMusicResponse]:
        engine = self._engine(request.model)
        conditions = _conditions(request, self.settings.max_prompt_chars)
        strength = _optional(request, "audio_cover_strength")
        strength = 1.0 if strength is None else strength
        check_cover_strength(strength)
        music = MusicRequest(
            task=TaskType.COVER,
            conditions=conditions,
            source=await self._decode_source(request.source_audio, engine),
            cover_strength=strength,
            seed=_optional(request, "seed"),
            steps=_optional(request, "num_inference_steps"),
        )
        async for message in self._stream(engine, music, request.request_id, pb.CoverMusicResponse):
            yield message

    async def RepaintMusic(
        self, request: pb.RepaintMusicRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RepaintMusicResponse]:
        engine = self._engine(request.model)
        conditions = _conditions(request, self.settings.max_prompt_chars)
        end = _optional(request, "end_seconds")
        check_region_bounds(request.start_seconds, end)
        music = MusicRequest(
            task=TaskType.REPAINT,
            conditions=conditions,
            source=await self._decode_source(request.source_audio, engine),
            start_seconds=request.start_seconds,
            end_seconds=end,
            seed=_optional(request, "seed"),
            steps=_optional(request, "num_inference_steps"),
        )
        async for message in self._stream(engine, music, request.request_id, pb.RepaintMusicResponse):
            yield message

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = []
        for spec in self.registry.for_capability(MUSIC):
            ready, reason = self.pool.status(spec.id)
            engine = self.pool.engines.get(spec.id)
            loaded = engine if engine is not None and engine.ready else None
            models.append(
                pb.ModelInfo(
                    id=spec.id,
                    aliases=list(spec.aliases),
                    max_duration_seconds=max_duration_seconds(spec),
                    default_steps=spec.defaults.steps,
                    max_steps=spec.limits.max_steps,
                    sample_rate=loaded.sample_rate if loaded else 0,
                    channels=loaded.channels if loaded else 0,
                    ready=ready,
                    unavailable_reason=reason or "",
                )
            )
        return pb.ListModelsResponse(models=models)

    def _engine(self, model: str) -> MusicEngine:
        spec = self.registry.resolve(model or None, MUSIC, self.pool.default)
        return self.pool.get(spec.id)

    async def _decode_source(self, data: bytes, engine: MusicEngine) -> np.ndarray:
        """The untrusted source song, decoded (and resampled) in a decode worker process, at the
        model's rate and channels."""
        decoded = await self.decoder.run(
            "'source_audio'",
            decode_audio,
            data,
            max_seconds=engine.max_duration_seconds,
            max_bytes=self.settings.max_input_audio_bytes,
            field="source_audio",
            sample_rate=engine.sample_rate,
        )
        return await asyncio.to_thread(
            conform_audio,
            decoded.samples,
            decoded.sample_rate,
            sample_rate=engine.sample_rate,
            channels=engine.channels,
        )

    async def _stream(
        self, engine: MusicEngine, music: MusicRequest, request_id: str, response: type[ResponseT]
    ) -> AsyncIterator[ResponseT]:
        events = engine.run(music, request_id=request_id)
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Progress):
                    yield response(
                        progress=media_pb2.Progress(step=event.step, total_steps=event.total_steps)
                    )
                    continue
                yield response(result=_result_to_proto(event))
                pcm = event.pcm
                for offset in range(0, len(pcm), MAX_PCM_MESSAGE_BYTES):
                    yield response(pcm=pcm[offset : offset + MAX_PCM_MESSAGE_BYTES])
