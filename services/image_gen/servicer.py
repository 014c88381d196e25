"""``kiln.image.v1.ImageService``: protobuf in, registry rules, engine, protobuf out.

The servicer does no model work. ``GenerateImages`` checks the request with
:meth:`Registry.generation_params` (the single place where request rules and
defaults live; unset proto3 ``optional`` fields mean "use the default", a
``count`` of 0 means 1), picks the model's engine from the pool, and relays
the engine's events: one ``progress`` message per finished step, then one
``result``. When the call is cancelled (the client went away or the deadline
passed) gRPC cancels this coroutine; closing the engine's iterator stops the
pipeline at its next step and frees the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

import grpc

from kiln.common.v1 import media_pb2
from kiln.image.v1 import image_service_pb2 as pb
from kiln.image.v1 import image_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool, Progress
from services.common.registry import Registry
from services.image_gen.engines import CAPABILITY, ImageRequest, ImageResult

#: Full name of the service, for health and reflection.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["ImageService"].full_name


def _optional(message: Any, field: str) -> Any:
    return getattr(message, field) if message.HasField(field) else None


def _result_to_proto(result: ImageResult) -> pb.GeneratedImages:
    return pb.GeneratedImages(
        images=[
            media_pb2.Image(data=img.data, mime_type=img.mime_type, width=img.width, height=img.height)
            for img in result.images
        ],
        seed=result.seed,
        model=result.model,
        timing=media_pb2.Timing(
            queue_ms=result.queue_ms, inference_ms=result.inference_ms, encode_ms=result.encode_ms
        ),
        num_inference_steps=result.steps,
    )


class ImageServiceServicer(pb_grpc.ImageServiceServicer):
    """Text-to-image over gRPC."""

    def __init__(self, *, registry: Registry, pool: EnginePool, max_prompt_chars: int) -> None:
        self.registry = registry
        self.pool = pool
        self.max_prompt_chars = max_prompt_chars

    async def GenerateImages(
        self, request: pb.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateImagesResponse]:
        params = self.registry.generation_params(
            model=request.model or None,
            prompt=request.prompt,
            width=request.width,
            height=request.height,
            negative_prompt=_optional(request, "negative_prompt"),
            steps=_optional(request, "num_inference_steps"),
            guidance_scale=_optional(request, "guidance_scale"),
            seed=_optional(request, "seed"),
            count=request.count or None,
            max_prompt_chars=self.max_prompt_chars,
        )
        engine = self.pool.get(params.model.id)
        events = engine.run(ImageRequest.from_params(params), request_id=request.request_id)
        async with aclosing(events):
            async for event in events:
                if isinstance(event, Progress):
                    yield pb.GenerateImagesResponse(
                        progress=media_pb2.Progress(step=event.step, total_steps=event.total_steps)
                    )
                else:
                    yield pb.GenerateImagesResponse(result=_result_to_proto(event))

    async def ListModels(
        self, request: pb.ListModelsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListModelsResponse:
        models = []
        for spec in self.registry.for_capability(CAPABILITY):
            ready, reason = self.pool.status(spec.id)
            models.append(
                pb.ModelInfo(
                    id=spec.id,
                    aliases=list(spec.aliases),
                    max_width=spec.limits.max_width,
                    max_height=spec.limits.max_height,
                    default_steps=spec.defaults.steps,
                    default_guidance_scale=spec.defaults.guidance_scale,
                    ready=ready,
                    unavailable_reason=reason or "",
                )
            )
        return pb.ListModelsResponse(models=models)
