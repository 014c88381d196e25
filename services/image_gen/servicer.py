"""``kiln.image.v1.ImageService``: protobuf in, registry rules, engine, protobuf out.

The servicer does no model work. ``GenerateImages`` checks the request with
:func:`services.image_gen.rules.generation_params` and ``EditImages`` with
:func:`~services.image_gen.rules.output_size` and
:func:`~services.image_gen.rules.edit_params` (the single place where request
rules and defaults live; unset proto3 ``optional`` fields
mean "use the default", a ``count`` of 0 means 1, ``IMAGE_FORMAT_UNSPECIFIED``
means PNG). The style preset is applied there, once: the edge sends prompts it
already styled with an empty ``style_preset``.

``EditImages`` decodes its untrusted inputs (and mask) through
:func:`services.common.media.image.decode_image` in decode worker processes
(:class:`~services.common.decoding.DecodePool`), with the
configured byte and pixel limits: the first input first (its size is the
default output size), then, once the request passed the registry's rules (at
most ``max_input_images`` inputs), the others. Every bad input is an
``InvalidRequest`` naming the input.

Both streaming RPCs relay the engine's events: one ``progress`` message per
finished step, then one ``result``. When the call is cancelled (the client
went away or the deadline passed) gRPC cancels this coroutine; closing the
engine's iterator stops the pipeline at its next step and frees the engine.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from contextlib import aclosing
from typing import Any

import grpc
from PIL import Image

from kiln.common.v1 import media_pb2
from kiln.image.v1 import image_service_pb2 as pb
from kiln.image.v1 import image_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidRequest
from services.common.proto_enums import image_format_name
from services.common.registry import DEFAULT_EDIT_MODEL, IMAGE_EDIT
from services.common.runner import Progress
from services.common.servicer import EngineServicer
from services.image_gen.engines import DiffusersImageEngine, ImageRequest, ImageResult, served_models
from services.image_gen.rules import GenerationParams, edit_params, generation_params, output_size

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


class ImageServiceServicer(EngineServicer[DiffusersImageEngine], pb_grpc.ImageServiceServicer):
    """Text-to-image and image editing over gRPC."""

    async def GenerateImages(
        self, request: pb.GenerateImagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateImagesResponse]:
        params = generation_params(
            self.registry,
            model=request.model or None,
            prompt=request.prompt,
            width=request.width,
            height=request.height,
            negative_prompt=_optional(request, "negative_prompt"),
            steps=_optional(request, "num_inference_steps"),
            guidance_scale=_optional(request, "guidance_scale"),
            seed=_optional(request, "seed"),
            count=request.count or None,
            output_format=image_format_name(request.output_format),
            embed_metadata=request.embed_metadata,
            style_preset=request.style_preset or None,
            max_prompt_chars=self.settings.max_prompt_chars,
        )
        async for event in self._run(params, ImageRequest.from_params(params), request.request_id):
            if isinstance(event, Progress):
                yield pb.GenerateImagesResponse(
                    progress=media_pb2.Progress(step=event.step, total_steps=event.total_steps)
                )
            else:
                yield pb.GenerateImagesResponse(result=_result_to_proto(event))

    async def EditImages(
        self, request: pb.EditImagesRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.EditImagesResponse]:
        spec = self.registry.resolve(request.model or None, IMAGE_EDIT, DEFAULT_EDIT_MODEL)
        inputs = list(request.input_images)
        first = await self._decode(inputs[:1], "input image") if inputs else []
        width, height = output_size(
            spec,
            width=request.width or None,
            height=request.height or None,
            first_input=first[0].size if first else None,
            match_image_size=request.match_image_size,
        )
        params = edit_params(
            self.registry,
            model=spec.id,
            inputs=inputs,
            prompt=request.prompt,
            width=width,
            height=height,
            negative_prompt=_optional(request, "negative_prompt"),
            steps=_optional(request, "num_inference_steps"),
            guidance_scale=_optional(request, "guidance_scale"),
            seed=_optional(request, "seed"),
            count=request.count or None,
            output_format=image_format_name(request.output_format),
            embed_metadata=request.embed_metadata,
            style_preset=request.style_preset or None,
            mask=request.mask,
            max_prompt_chars=self.settings.max_prompt_chars,
        )
        rest = await self._decode(inputs[1:], "input image", start=2)
        mask = (await self._decode([request.mask], "mask"))[0] if request.mask else None
        engine_request = ImageRequest.from_params(params, inputs=(*first, *rest), mask=mask)
        async for event in self._run(params, engine_request, request.request_id):
            if isinstance(event, Progress):
                yield pb.EditImagesResponse(
                    progress=media_pb2.Progress(step=event.step, total_steps=event.total_steps)
                )
            else:
                yield pb.EditImagesResponse(result=_result_to_proto(event))

    async def _decode(self, blobs: Sequence[bytes], what: str, *, start: int = 1) -> list[Image.Image]:
        """Decodes untrusted image files in decode worker processes; errors name the file."""
        images = []
        for number, data in enumerate(blobs, start):
            try:
                images.append(await self.decode_image(data))
            except InvalidRequest as exc:
                label = f"{what.capitalize()} {number}" if what != "mask" else "The mask"
                message = exc.message[0].lower() + exc.message[1:] if exc.message else ""
                raise InvalidRequest(f"{label}: {message}") from exc
        return images

    async def _run(
        self, params: GenerationParams, request: ImageRequest, request_id: str
    ) -> AsyncIterator[Progress | ImageResult]:
        engine = self.pool.get(params.model.id)
        events = engine.run(request, request_id=request_id)
        async with aclosing(events):
            async for event in events:
                yield event

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
                    max_width=spec.limits.max_width,
                    max_height=spec.limits.max_height,
                    default_steps=spec.defaults.steps,
                    default_guidance_scale=spec.defaults.guidance_scale,
                    ready=ready,
                    unavailable_reason=reason or "",
                    capabilities=list(spec.capabilities),
                )
            )
        return pb.ListModelsResponse(models=models)
