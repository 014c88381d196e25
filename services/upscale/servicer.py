"""``kiln.upscale.v1.UpscaleService``: protobuf in, checks, upscale engine, protobuf out.

``UpscaleImage`` reads the untrusted image's header in a decode worker process
(:class:`~services.common.decoding.DecodePool`; :func:`services.common.media.image.probe_image`, within the configured byte and
pixel limits), lets :func:`services.upscale.rules.upscale_params` check the
method, the scale (0 means the method's own), ``face_enhance`` and the output
size, then decodes the image fully in a decode worker
(:func:`services.common.media.image.decode_image`; checked again with the decoded,
EXIF-upright size), runs the method's engine and encodes the result (PNG
unless ``output_format`` says otherwise) on a worker thread. Every bad input
is an :class:`~services.common.errors.InvalidRequest` (INVALID_ARGUMENT).
"""

from __future__ import annotations

import asyncio
import time

import grpc
from PIL import Image

from kiln.common.v1 import media_pb2
from kiln.upscale.v1 import upscale_service_pb2 as pb
from kiln.upscale.v1 import upscale_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidRequest
from services.common.media.image import decode_image, encode_image, image_mime_type, probe_image
from services.common.proto_enums import image_format_name
from services.common.servicer import EngineServicer
from services.upscale.engines import UpscaleEngine, UpscaleRequest
from services.upscale.rules import UpscaleParams, upscale_params

#: Full name of the service, for health and reflection.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["UpscaleService"].full_name


class UpscaleServicer(EngineServicer[UpscaleEngine], pb_grpc.UpscaleServiceServicer):
    """Image super-resolution over gRPC."""

    async def UpscaleImage(
        self, request: pb.UpscaleImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpscaleImageResponse:
        fmt = image_format_name(request.output_format)
        if request.scale < 0:
            raise InvalidRequest(f"'scale' must be positive, not {request.scale}")
        max_pixels, max_bytes = self.settings.max_input_image_pixels, self.settings.max_input_image_bytes
        info = await self.decoder.run(
            "The image", probe_image, request.image, max_pixels=max_pixels, max_bytes=max_bytes
        )
        params = self._params(request, info.width, info.height)
        engine = self.pool.get(params.model.id)
        image = await self.decoder.run(
            "The image", decode_image, request.image, max_pixels=max_pixels, max_bytes=max_bytes
        )
        if image.size != (info.width, info.height):  # EXIF rotation swapped the sides
            params = self._params(request, image.width, image.height)
        result = await engine.result(UpscaleRequest(image, params.scale), request_id=request.request_id)
        started = time.perf_counter()
        data = await asyncio.to_thread(encode_image, self._encodable(result.image, fmt), fmt)
        encode_ms = (time.perf_counter() - started) * 1000
        return pb.UpscaleImageResponse(
            image=media_pb2.Image(
                data=data,
                mime_type=image_mime_type(fmt),
                width=result.image.width,
                height=result.image.height,
            ),
            method=params.model.id,
            scale=result.scale,
            backend=result.backend,
            timing=media_pb2.Timing(
                queue_ms=result.queue_ms, inference_ms=result.inference_ms, encode_ms=encode_ms
            ),
            batch_size=result.batch_size,
        )

    def _params(self, request: pb.UpscaleImageRequest, width: int, height: int) -> UpscaleParams:
        return upscale_params(
            self.registry,
            method=request.method,
            scale=request.scale or None,
            width=width,
            height=height,
            face_enhance=request.face_enhance,
        )

    @staticmethod
    def _encodable(image: Image.Image, fmt: str) -> Image.Image:
        """JPEG has no alpha: flatten transparency onto white rather than dropping it to black."""
        if fmt == "jpeg" and "A" in image.getbands():
            background = Image.new("RGB", image.size, (255, 255, 255))
            background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
            return background
        return image
