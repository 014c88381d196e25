"""``POST /v1/images/generations`` and ``POST /v1/images/generations/batch``."""

from __future__ import annotations

import asyncio
import base64
import time
from typing import Any

from aiohttp import web

from edge.clients import generation_request
from edge.errors import envelope
from edge.flow import Billed, run_billed
from edge.keys import MEDIA, REGISTRY, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.responses import json_response
from edge.schemas import (
    MAX_BATCH_REQUESTS,
    BatchImageGenerationRequest,
    ImageGenerationRequest,
    parse_body,
)
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from services.common.errors import InvalidRequest, KilnError
from services.common.money import format_credits
from services.common.registry import GenerationParams


def usage_for(params: GenerationParams) -> billing_pb.Usage:
    return billing_pb.Usage(
        image_generation=billing_pb.ImageGenerationUsage(
            model=params.model.id,
            width=params.width,
            height=params.height,
            steps=params.steps,
            count=params.count,
        )
    )


def _media_base(request: web.Request) -> str:
    base = request.app[SETTINGS].public_base_url
    return base.rstrip("/") if base else f"{request.scheme}://{request.host}"


async def _generate_one(
    request: web.Request, params: GenerationParams, response_format: str | None, request_id: str
) -> dict[str, Any]:
    """Runs one generation and stores its images; the contract's response object."""
    result = await request.app[UPSTREAMS].images.generate(generation_request(params, request_id))
    store = request.app[MEDIA]
    base = _media_base(request)
    data: list[dict[str, Any]] = []
    for image in result.images:
        media_id = await store.put_async(image.data, image.mime_type)
        item: dict[str, Any] = {"url": f"{base}/v1/media/{media_id}"}
        if response_format != "url":
            item["b64_json"] = base64.b64encode(image.data).decode("ascii")
        if response_format == "b64_json":
            del item["url"]
        item["revised_prompt"] = None
        data.append(item)
    return {"created": int(time.time()), "data": data, "seed": result.seed}


def _json(request: web.Request, body: dict[str, Any], charged: int) -> web.Response:
    response = json_response(body)
    response.headers["X-Credits-Charged"] = format_credits(charged)
    return response


async def create_generation(request: web.Request) -> web.Response:
    body = parse_body(ImageGenerationRequest, await request.read())
    params = body.to_params(request.app[REGISTRY], max_prompt_chars=request.app[SETTINGS].max_prompt_chars)

    async def work(auth: billing_pb.AuthorizeResponse) -> Billed[dict[str, Any]]:
        result = await _generate_one(request, params, body.response_format, request[REQUEST_ID])
        return Billed(result, auth.reservation.amount_hundredths)

    billed = await run_billed(request, [usage_for(params)], work)
    return _json(request, billed.result, billed.charged)


async def create_generation_batch(request: web.Request) -> web.Response:
    body = parse_body(BatchImageGenerationRequest, await request.read())
    if not 1 <= len(body.requests) <= MAX_BATCH_REQUESTS:
        raise InvalidRequest(f"'requests' must hold between 1 and {MAX_BATCH_REQUESTS} requests")
    settings, registry = request.app[SETTINGS], request.app[REGISTRY]
    all_params = []
    for index, item in enumerate(body.requests):
        try:
            all_params.append(item.to_params(registry, max_prompt_chars=settings.max_prompt_chars))
        except InvalidRequest as err:
            raise InvalidRequest(f"requests[{index}]: {err.message}") from None

    async def work(auth: billing_pb.AuthorizeResponse) -> Billed[dict[str, Any]]:
        request_id = request[REQUEST_ID]
        outcomes = await asyncio.gather(
            *(
                _generate_one(request, params, item.response_format, f"{request_id}.{index}")
                for index, (params, item) in enumerate(zip(all_params, body.requests, strict=True))
            ),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if len(failures) == len(outcomes):
            raise failures[0]
        entries: list[dict[str, Any]] = []
        charged = 0
        for outcome, amount in zip(outcomes, auth.item_amounts_hundredths, strict=True):
            if isinstance(outcome, KilnError):
                entries.append(envelope(outcome.message, outcome.error_type))
            elif isinstance(outcome, BaseException):
                raise outcome
            else:
                entries.append(outcome)
                charged += amount
        return Billed({"data": entries}, charged)

    billed = await run_billed(request, [usage_for(p) for p in all_params], work)
    return _json(request, billed.result, billed.charged)
