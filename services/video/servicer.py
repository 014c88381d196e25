"""``kiln.video.v1.VideoService``: protobuf in, request rules, engine, protobuf out.

The servicer does no model work. ``GenerateVideo`` resolves the model (an id
or alias; ``turbodiffusion-wan2.2-i2v`` when empty), checks the request with
:func:`services.video.rules.video_params` (unset proto3 ``optional`` fields
mean "use the model's default"; a ``num_frames`` or ``num_steps`` of 0 is
refused), then decodes the untrusted image through
:func:`services.common.media.image.decode_image` in a decode worker process
(:class:`~services.common.decoding.DecodePool`; the configured
byte and pixel limits; not an image is INVALID_ARGUMENT) and picks the output
size with :func:`services.video.rules.video_size`. Every refusal happens
before the engine is asked for anything.

The stream relays the engine's events: one ``progress`` per denoising step,
then the MP4 in ``mp4_chunk`` messages of at most :data:`MP4_CHUNK_BYTES`, then
the ``summary``. When the call is cancelled (the client went away or the
deadline passed) gRPC cancels this coroutine; closing the engine's iterator
stops the pipeline at its next step and frees the engine.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc
from PIL import Image

from kiln.common.v1 import media_pb2
from kiln.video.v1 import video_service_pb2 as pb
from kiln.video.v1 import video_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidRequest
from services.common.registry import DEFAULT_VIDEO_MODEL, IMAGE_TO_VIDEO
from services.common.runner import Progress
from services.common.servicer import EngineServicer
from services.video.engines import VideoRequest, VideoResult, WanI2VEngine, served_models
from services.video.rules import VIDEO_RESOLUTIONS, model_fps, video_params, video_size

#: Full name of the service, for health and reflection.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["VideoService"].full_name
#: Largest MP4 payload of one stream message.
MP4_CHUNK_BYTES = 1024 * 1024


def _optional(message: Any, field: str) -> Any:
    return getattr(message, field) if message.HasField(field) else None


def summary_to_proto(result: VideoResult) -> pb.VideoSummary:
    return pb.VideoSummary(
        mime_type=result.mime_type,
        size_bytes=len(result.mp4),
        sha256=hashlib.sha256(result.mp4).hexdigest(),
        num_frames=result.num_frames,
        fps=result.fps,
        width=result.width,
        height=result.height,
        duration_seconds=result.duration_seconds,
        seed=result.seed,
        model=result.model,
        num_steps=result.steps,
        resolution=result.resolution,
        use_ode=result.use_ode,
        guidance_scale=result.guidance_scale,
        timing=media_pb2.Timing(
            queue_ms=result.queue_ms, inference_ms=result.inference_ms, encode_ms=result.encode_ms
        ),
    )


class VideoServiceServicer(EngineServicer[WanI2VEngine], pb_grpc.VideoServiceServicer):
    """Image-to-video over gRPC."""

    async def GenerateVideo(
        self, request: pb.GenerateVideoRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateVideoResponse]:
        spec = self.registry.resolve(request.model or None, IMAGE_TO_VIDEO, DEFAULT_VIDEO_MODEL)
        params = video_params(
            spec,
            prompt=request.prompt,
            negative_prompt=_optional(request, "negative_prompt"),
            num_frames=_optional(request, "num_frames"),
            steps=_optional(request, "num_steps"),
            resolution=request.resolution or None,
            use_ode=request.use_ode,
            guidance_scale=_optional(request, "guidance_scale"),
            seed=_optional(request, "seed"),
            max_prompt_chars=self.settings.max_prompt_chars,
        )
        if not request.image:
            raise InvalidRequest("'image' is required: the first frame, a PNG, JPEG or WebP file")
        image = await self._decode(request.image)
        width, height = video_size(spec, image.size, params.resolution)
        engine = self.pool.get(spec.id)
        events = engine.run(
            VideoRequest.from_params(params, image=image, width=width, height=height),
            request_id=request.request_id,
        )
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Progress):
                    yield pb.GenerateVideoResponse(
                        progress=media_pb2.Progress(step=event.step, total_steps=event.total_steps)
                    )
                    continue
                view = memoryview(event.mp4)
                for offset in range(0, len(view), MP4_CHUNK_BYTES):
                    yield pb.GenerateVideoResponse(mp4_chunk=bytes(view[offset : offset + MP4_CHUNK_BYTES]))
                yield pb.GenerateVideoResponse(summary=summary_to_proto(event))

    async def _decode(self, data: bytes) -> Image.Image:
        """Decodes the untrusted first frame (in a decode worker process); errors say it is the image."""
        try:
            return await self.decode_image(data)
        except InvalidRequest as exc:
            message = exc.message[0].lower() + exc.message[1:] if exc.message else ""
            raise InvalidRequest(f"'image': {message}") from exc

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = []
        for spec in served_models(self.registry):
            ready, reason = self.pool.status(spec.id)
            models.append(
                pb.ModelInfo(
                    id=spec.id,
                    aliases=list(spec.aliases),
                    resolutions=list(VIDEO_RESOLUTIONS),
                    max_frames=spec.limits.max_frames,
                    default_frames=spec.defaults.num_frames,
                    fps=model_fps(spec),
                    max_steps=spec.limits.max_steps,
                    default_steps=spec.defaults.steps,
                    default_guidance_scale=spec.defaults.guidance_scale,
                    ready=ready,
                    unavailable_reason=reason or "",
                )
            )
        return pb.ListModelsResponse(models=models)
