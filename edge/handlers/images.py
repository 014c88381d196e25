"""Image routes: generations, batch generations, edits and the style presets.

Every image response carries a ``timing`` object (queue, inference and encode
milliseconds measured by image_gen; store and total measured here) and the
same figures in a ``Server-Timing`` header. ``return_binary`` answers with the
file itself; the JSON keys then travel as headers.
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from edge.flow import Charge, Done, MediaFile, billed
from edge.forms import FORM_TYPES, read_body, read_form
from edge.keys import MEDIA, REGISTRY, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.responses import ProgressEvents, json_response
from edge.schemas import (
    MAX_BATCH_REQUESTS,
    BatchImageGenerationRequest,
    ImageEditForm,
    ImageEditRequest,
    ImageGenerationRequest,
    ImageOptions,
    parse_body,
    parse_form,
)
from edge.tasks import task_origin
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from services.common.errors import InvalidRequest, KilnError, envelope
from services.common.money import format_credits
from services.image_gen.rules import GenerationParams

#: Multipart file fields of an OpenAI edit; every other field is text.
IMAGE_FIELDS = ("image", "image[]")
MASK_FIELD = "mask"


def usage_for(params: GenerationParams) -> billing_pb.Usage:
    """What billing prices for a checked image request."""
    if params.inputs:
        return billing_pb.Usage(
            image_edit=billing_pb.ImageEditUsage(
                model=params.model.id,
                width=params.width,
                height=params.height,
                steps=params.steps,
                count=params.count,
                input_images=len(params.inputs),
            )
        )
    return billing_pb.Usage(
        image_generation=billing_pb.ImageGenerationUsage(
            model=params.model.id,
            width=params.width,
            height=params.height,
            steps=params.steps,
            count=params.count,
        )
    )


def media_base(request: web.Request) -> str:
    """scheme://host of the media URLs of an answer (a task's run: where the task was created)."""
    base = request.app[SETTINGS].public_base_url
    if base:
        return base.rstrip("/")
    return task_origin(request) or f"{request.scheme}://{request.host}"


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 3)


def timing_entry(service_timing: Any, store_seconds: float, started: float) -> dict[str, float]:
    """The response's ``timing``: queue, inference and encode as the service measured them,
    store and total as measured here (milliseconds)."""
    return {
        "queue_ms": round(service_timing.queue_ms, 3),
        "inference_ms": round(service_timing.inference_ms, 3),
        "encode_ms": round(service_timing.encode_ms, 3),
        "store_ms": _ms(store_seconds),
        "total_ms": _ms(time.perf_counter() - started),
    }


@dataclass
class ImageOutcome:
    """One request's images (stored by the billed flow before the charge), the usage they
    are, and the response entry that describes them."""

    entry: dict[str, Any]
    files: list[MediaFile]
    usage: billing_pb.Usage


async def _produce(
    request: web.Request,
    params: GenerationParams,
    options: ImageOptions,
    request_id: str,
    started: float,
    progress: ProgressEvents | None = None,
) -> ImageOutcome:
    """Runs one generation or edit (its steps sent as ``progress`` events when the client asked
    for them); the images get their media ids (and URLs) here."""
    result = await request.app[UPSTREAMS].images.run(
        params, request_id, progress.step if progress is not None and progress.wanted else None
    )
    store = request.app[MEDIA]
    base = media_base(request)
    files = [MediaFile(image.data, image.mime_type, store.new_id()) for image in result.images]
    data: list[dict[str, Any]] = []
    if not options.return_binary:
        for file in files:
            item: dict[str, Any] = {}
            if options.response_format != "b64_json":
                item["url"] = f"{base}/v1/media/{file.media_id}"
            if options.response_format != "url":
                item["b64_json"] = base64.b64encode(file.data).decode("ascii")
            item["revised_prompt"] = None
            data.append(item)
    entry = {"created": int(time.time()), "data": data, "seed": result.seed, "timing": result.timing}
    return ImageOutcome(entry, files, usage_for(dataclasses.replace(params, count=len(files))))


def _finish(outcome: ImageOutcome, charge: Charge, started: float) -> dict[str, Any]:
    """The response entry with its timing, once the images are stored and charged."""
    return outcome.entry | {"timing": timing_entry(outcome.entry["timing"], charge.store_seconds, started)}


def _server_timing(timing: dict[str, float]) -> str:
    return ", ".join(f"{name.removesuffix('_ms')};dur={value}" for name, value in timing.items())


async def _respond(
    request: web.Request, params: GenerationParams, options: ImageOptions, started: float, *, dry_run: bool
) -> web.StreamResponse:
    """The billed flow for one checked image request, answered as JSON or as the file
    (``dry_run``: the request's ``dry_run`` field, see :func:`edge.flow.billed`)."""

    # Accept: text/event-stream: a progress event per step, then the JSON answer as `result`.
    progress = ProgressEvents(request)

    async def work(auth: billing_pb.AuthorizeResponse) -> Done[ImageOutcome]:
        outcome = await _produce(request, params, options, request[REQUEST_ID], started, progress)
        return Done(outcome, [outcome.usage], files=outcome.files)

    async def answer(outcome: ImageOutcome, charge: Charge) -> web.StreamResponse:
        entry = _finish(outcome, charge, started)
        headers = {
            "X-Credits-Charged": format_credits(charge.charged),
            "Server-Timing": _server_timing(entry["timing"]),
        }
        if progress.wanted:
            return await progress.finish(entry)
        if options.return_binary:
            file = outcome.files[0]
            headers |= {"X-Seed": str(entry["seed"]), "Content-Location": f"/v1/media/{file.media_id}"}
            return web.Response(body=file.data, content_type=file.mime_type, headers=headers)
        return json_response(entry, headers=headers)

    try:
        return await billed(
            request, [usage_for(params)], work, answer, streamed=progress.wanted, dry_run=dry_run
        )
    except KilnError as err:
        ended = await progress.fail(envelope(err.message, err.error_type))
        if ended is None:
            raise
        return ended


async def create_generation(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    body = parse_body(ImageGenerationRequest, await read_body(request))
    params = body.to_params(request.app[REGISTRY], max_prompt_chars=request.app[SETTINGS].max_prompt_chars)
    return await _respond(request, params, body, started, dry_run=body.dry_run)


async def create_edit(request: web.Request) -> web.StreamResponse:
    """The contract's JSON body, or OpenAI's multipart form (``client.images.edit``)."""
    started = time.perf_counter()
    registry, settings = request.app[REGISTRY], request.app[SETTINGS]
    options: ImageEditForm | ImageEditRequest
    if request.content_type in FORM_TYPES:
        form, inputs, mask = await _read_edit_form(request)
        params = form.to_params(registry, settings, inputs=inputs, mask=mask)
        options = form
    else:
        body = parse_body(ImageEditRequest, await read_body(request))
        params = body.to_params(registry, settings)
        options = body
    return await _respond(request, params, options, started, dry_run=options.dry_run)


async def _read_edit_form(request: web.Request) -> tuple[ImageEditForm, list[bytes], bytes]:
    """OpenAI's edit form: ``image`` / ``image[]`` files, an optional ``mask`` file, text fields."""
    form = await read_form(request, files=(*IMAGE_FIELDS, MASK_FIELD))
    inputs = [data for name, data in form.files if name in IMAGE_FIELDS]
    masks = [data for name, data in form.files if name == MASK_FIELD]
    if len(masks) > 1:
        raise InvalidRequest(f"The field '{MASK_FIELD}' is given more than once")
    return parse_form(ImageEditForm, form.fields), inputs, masks[0] if masks else b""


async def create_generation_batch(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    body = parse_body(BatchImageGenerationRequest, await read_body(request))
    if not 1 <= len(body.requests) <= MAX_BATCH_REQUESTS:
        raise InvalidRequest(f"'requests' must hold between 1 and {MAX_BATCH_REQUESTS} requests")
    settings, registry = request.app[SETTINGS], request.app[REGISTRY]
    all_params = []
    for index, item in enumerate(body.requests):
        try:
            if item.return_binary:
                raise InvalidRequest("'return_binary' is not available in a batch")
            all_params.append(item.to_params(registry, max_prompt_chars=settings.max_prompt_chars))
        except InvalidRequest as err:
            raise InvalidRequest(f"requests[{index}]: {err.message}") from None

    async def work(auth: billing_pb.AuthorizeResponse) -> Done[list[ImageOutcome | KilnError]]:
        request_id = request[REQUEST_ID]
        outcomes = await asyncio.gather(
            *(
                _produce(request, params, item, f"{request_id}.{index}", started)
                for index, (params, item) in enumerate(zip(all_params, body.requests, strict=True))
            ),
            return_exceptions=True,
        )
        failures = [o for o in outcomes if isinstance(o, BaseException)]
        if len(failures) == len(outcomes):
            raise failures[0]
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, KilnError):
                raise outcome
        made = [o for o in outcomes if isinstance(o, ImageOutcome)]
        return Done(
            [o for o in outcomes if isinstance(o, ImageOutcome | KilnError)],
            [o.usage for o in made],  # billing charges the entries that succeeded
            files=[file for o in made for file in o.files],
        )

    async def answer(outcomes: list[ImageOutcome | KilnError], charge: Charge) -> web.StreamResponse:
        entries = [
            envelope(o.message, o.error_type) if isinstance(o, KilnError) else _finish(o, charge, started)
            for o in outcomes
        ]
        return json_response({"data": entries}, headers={"X-Credits-Charged": format_credits(charge.charged)})

    return await billed(request, [usage_for(p) for p in all_params], work, answer, dry_run=body.dry_run)


async def list_styles(request: web.Request) -> web.Response:
    """The style presets ``style_preset`` accepts."""
    styles = [style.model_dump() for style in request.app[REGISTRY].styles.values()]
    return json_response({"object": "list", "data": styles})
