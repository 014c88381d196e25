"""``POST /v1/images/upscale``: Real-ESRGAN, Swin2SR or Lanczos.

The image is checked from its header (format, pixels, bytes) and the method's
rules (scale, output limit, face_enhance) before anything is reserved; the
price follows the method and the output pixels. The answer is the contract's
``{created, data: [{url, b64_json}]}`` plus ``timing`` (and ``X-Upscale-Backend``
says what ran: onnxruntime and its execution provider, torch, or Pillow).
"""

from __future__ import annotations

import base64
import time

from aiohttp import web

from edge.flow import Charge, Done, MediaFile, billed, credential_from
from edge.forms import read_body
from edge.handlers.images import media_base, timing_entry
from edge.keys import MEDIA, REGISTRY, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.responses import json_response
from edge.schemas import UpscaleRequest, decode_base64_file, parse_body
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.upscale.v1 import upscale_service_pb2 as upscale_pb
from services.common.media.image import probe_image
from services.common.money import format_credits
from services.common.proto_enums import IMAGE_FORMATS
from services.upscale.rules import upscale_params


async def upscale_image(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    credential_from(request)
    settings = request.app[SETTINGS]
    body = parse_body(UpscaleRequest, await read_body(request))
    data = decode_base64_file(body.image, "image")
    info = probe_image(
        data, max_pixels=settings.max_input_image_pixels, max_bytes=settings.max_input_image_bytes
    )
    params = upscale_params(
        request.app[REGISTRY],
        method=body.method,
        scale=body.scale,
        width=info.width,
        height=info.height,
        face_enhance=body.face_enhance,
    )
    usage = billing_pb.Usage(
        upscale=billing_pb.UpscaleUsage(
            model=params.model.id, output_width=params.output_width, output_height=params.output_height
        )
    )
    call = upscale_pb.UpscaleImageRequest(
        image=data,
        method=params.model.id,
        scale=params.scale,
        request_id=request[REQUEST_ID],
        output_format=IMAGE_FORMATS[body.format or "png"],
    )

    media_id = request.app[MEDIA].new_id()

    async def work(auth: billing_pb.AuthorizeResponse) -> Done[upscale_pb.UpscaleImageResponse]:
        result = await request.app[UPSTREAMS].upscale.upscale(call)
        image = MediaFile(result.image.data, result.image.mime_type, media_id)
        return Done(result, [usage], files=[image])

    async def answer(result: upscale_pb.UpscaleImageResponse, charge: Charge) -> web.StreamResponse:
        item: dict[str, str] = {}
        if body.response_format != "b64_json":
            item["url"] = f"{media_base(request)}/v1/media/{media_id}"
        if body.response_format != "url":
            item["b64_json"] = base64.b64encode(result.image.data).decode("ascii")
        payload = {
            "created": int(time.time()),
            "data": [item],
            "method": result.method,
            "scale": result.scale,
            "timing": timing_entry(result.timing, charge.store_seconds, started),
        }
        headers = {
            "X-Credits-Charged": format_credits(charge.charged),
            "X-Upscale-Backend": result.backend,
            "X-Batch-Size": str(result.batch_size),
        }
        return json_response(payload, headers=headers)

    return await billed(request, [usage], work, answer, dry_run=body.dry_run)
