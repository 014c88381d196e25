"""Segmentation and background removal: ``/v1/images/segmentations``,
``/v1/images/remove-background`` and ``/v1/videos/remove-background`` (multipart).

Images cost 0.25 credits each. A video is reserved for the frame count the
segmentation service reads from its container (an upper bound), and only the
frames where the object was found are charged (billing prices the frames the
edge reports, capped at the hold); the upload streams to the
service in chunks as it arrives, once the least the request can cost (one
frame) is held (:class:`EntryHold`: an account that cannot pay gets its 402
before the service reads a byte), and the result is kept in a spooled temporary
file (memory stays flat) so that the frame counts can go in the headers.

A dry run of a video (``?dry_run=true``, or a ``dry_run`` field before the
file) holds nothing: billing checks the credential before the upload streams,
and the service only probes the video, since its frame count (read from the
container by the service's isolated decoder) is the price; the edge has no
decoder of its own to count frames with, and the probe is what the real call
holds for.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import functools
import json
import logging
import math
import tempfile
import time
from typing import Any

from aiohttp import web

from edge.clients import VideoSession
from edge.flow import (
    HOLD_MARGIN_SECONDS,
    Charge,
    Done,
    MediaFile,
    billed,
    credential_from,
    dry_run_requested,
)
from edge.forms import BodyRefused, FormReader, body_digest, note_part, read_upload_form
from edge.keys import MEDIA, PENDING, REGISTRY, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.responses import json_response
from edge.retention import DISK_GUARD
from edge.schemas import BackgroundRemovalForm, DryRun, SegmentationForm, parse_form
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.segmentation.v1 import segmentation_service_pb2 as seg_pb
from services.common.errors import InvalidRequest, KilnError, ProcessingError, quoted
from services.common.media.image import probe_image
from services.common.money import format_credits
from services.common.registry import DEFAULT_SEGMENTATION_MODEL, SEGMENTATION, ModelSpec
from services.segmentation import rules

#: Upload chunk forwarded to the service, and output chunk written to the client.
CHUNK_BYTES = 256 * 1024
#: Output kept in memory up to this size, then in a temporary file.
SPOOL_BYTES = 8 * 1024 * 1024
log = logging.getLogger("kiln.edge")
OUTPUTS = {"cutout": seg_pb.SEGMENTATION_OUTPUT_CUTOUT, "mask": seg_pb.SEGMENTATION_OUTPUT_MASK}


class EntryHold:
    """The hold a video upload needs before its first byte goes to the service: the least the
    request can cost (one frame), so an account that cannot pay gets its 402 before the
    service reads anything. It is released when the hold of the whole video (priced from
    the probe) replaces it, or when the request ends first (also when cancelled: the
    release is shielded and the edge's shutdown waits for it)."""

    def __init__(self, request: web.Request, reservation_id: str) -> None:
        self.request = request
        self.reservation_id = reservation_id
        self._released = False

    @classmethod
    async def place(
        cls, request: web.Request, credential: billing_pb.Credential, usage: billing_pb.Usage
    ) -> EntryHold:
        request.app[DISK_GUARD].check()  # a 503 before anything is held (edge.retention)
        settings = request.app[SETTINGS]
        ttl = min(24 * 3600, math.ceil(settings.service_timeout_seconds) + HOLD_MARGIN_SECONDS)
        call = asyncio.ensure_future(
            request.app[UPSTREAMS].billing.authorize(
                credential, [usage], request[REQUEST_ID], ttl_seconds=ttl
            )
        )
        try:
            auth = await asyncio.shield(call)
        except asyncio.CancelledError:  # the client left while billing held: release it once known
            call.add_done_callback(functools.partial(_release_late, request))
            raise
        return cls(request, auth.reservation.id)

    async def release(self) -> None:
        if self._released:
            return
        self._released = True
        task = asyncio.ensure_future(_release(self.request, self.reservation_id))
        self.request.app[PENDING].add(task)
        await asyncio.shield(task)


async def _release(request: web.Request, reservation_id: str) -> None:
    try:
        await request.app[UPSTREAMS].billing.release(reservation_id, request[REQUEST_ID])
    except KilnError as err:  # the hold expires on its own
        log.warning("release of %s failed (%s); it will expire", reservation_id, err.message)


def _release_late(request: web.Request, call: asyncio.Future[billing_pb.AuthorizeResponse]) -> None:
    if not call.cancelled() and call.exception() is None:
        task = asyncio.ensure_future(_release(request, call.result().reservation.id))
        request.app[PENDING].add(task)


def _dry_run_field(fields: dict[str, str]) -> bool:
    """The form's ``dry_run`` field, when it came before the video (read as the whole form is)."""
    return parse_form(DryRun, {name: fields[name] for name in ("dry_run",) if name in fields}).dry_run


def _usage(spec: ModelSpec, frames: int) -> billing_pb.Usage:
    return billing_pb.Usage(segmentation=billing_pb.SegmentationUsage(model=spec.id, frames=frames))


def _model(request: web.Request, name: str | None) -> ModelSpec:
    return request.app[REGISTRY].resolve(name, SEGMENTATION, DEFAULT_SEGMENTATION_MODEL)


def _json_field(text: str, name: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        raise InvalidRequest(f"'{name}' is not valid JSON") from None


def _points(form: SegmentationForm, width: int, height: int) -> list[seg_pb.Point]:
    """``point_coords`` ([[x, y], ...] in the image's pixels) and ``point_labels`` (1/0)."""
    if form.point_coords is None:
        if form.point_labels is not None:
            raise InvalidRequest("'point_labels' needs 'point_coords'")
        return []
    coords = _json_field(form.point_coords, "point_coords")
    if not isinstance(coords, list) or not coords:
        raise InvalidRequest("'point_coords' must be a non-empty JSON array of [x, y] pairs")
    points: list[seg_pb.Point] = []
    for index, pair in enumerate(coords):
        if (
            not isinstance(pair, list)
            or len(pair) != 2
            or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in pair)
        ):
            raise InvalidRequest(f"point_coords[{index}] must be an [x, y] pair of numbers")
        x, y = float(pair[0]), float(pair[1])
        if not (0 <= x < width and 0 <= y < height):
            raise InvalidRequest(
                f"point_coords[{index}] ({pair[0]}, {pair[1]}) is outside the {width}x{height} image"
            )
        points.append(seg_pb.Point(x=x, y=y))
    if form.point_labels is not None:
        labels = _json_field(form.point_labels, "point_labels")
        if not isinstance(labels, list) or len(labels) != len(points):
            raise InvalidRequest(
                f"'point_labels' must be a JSON array with one label per point ({len(points)} points)"
            )
        for index, (label, point) in enumerate(zip(labels, points, strict=True)):
            if label not in (0, 1) or isinstance(label, bool):
                raise InvalidRequest(f"point_labels[{index}] must be 1 (foreground) or 0 (background)")
            point.foreground = label == 1
    return points


def _png(body: bytes, filename: str, headers: dict[str, str]) -> web.Response:
    headers = {**headers, "Content-Disposition": f'inline; filename="{filename}"'}
    return web.Response(body=body, content_type="image/png", headers=headers)


async def segment_image(request: web.Request) -> web.StreamResponse:
    """The best mask as ``segmented_image.png`` (the object on transparency, or ``output=mask``
    for a grey mask); with ``Accept: application/json``, every candidate with its score."""
    started = time.perf_counter()
    credential_from(request)
    settings = request.app[SETTINGS]
    data, fields = await read_upload_form(request, field="file", what="an image")
    form = parse_form(SegmentationForm, fields)
    spec = _model(request, form.model)
    info = probe_image(
        data, max_pixels=settings.max_input_image_pixels, max_bytes=settings.max_input_image_bytes
    )
    prompt = form.prompt.strip()
    points = _points(form, info.width, info.height)
    if not prompt and not points:
        raise InvalidRequest("Give 'prompt' (what to segment) or 'point_coords', or both.")
    multimask = form.multimask_output
    if multimask and not points:
        raise InvalidRequest("'multimask_output' works with 'point_coords' only.")
    rules.check_prompt_length(prompt, max_chars=settings.max_prompt_chars)
    call = seg_pb.SegmentImageRequest(
        image=data,
        prompt=prompt,
        points=points,
        multimask_output=multimask,
        output=OUTPUTS[form.output],
        request_id=request[REQUEST_ID],
        model=spec.id,
    )

    store = request.app[MEDIA]

    async def work(
        auth: billing_pb.AuthorizeResponse,
    ) -> Done[tuple[seg_pb.SegmentImageResponse, list[MediaFile]]]:
        result = await request.app[UPSTREAMS].segmentation.segment(call)
        files = [MediaFile(mask.image.data, mask.image.mime_type, store.new_id()) for mask in result.masks]
        return Done((result, files), [_usage(spec, 1)], files=files)

    async def answer(
        done: tuple[seg_pb.SegmentImageResponse, list[MediaFile]], charge: Charge
    ) -> web.StreamResponse:
        result, files = done
        return _segmentation_answer(request, result, files, charge, started)

    return await billed(request, [_usage(spec, 1)], work, answer, dry_run=form.dry_run)


def _segmentation_answer(
    request: web.Request,
    result: seg_pb.SegmentImageResponse,
    files: list[MediaFile],
    charge: Charge,
    started: float,
) -> web.Response:
    candidates = [
        (mask, f"/v1/media/{file.media_id}") for mask, file in zip(result.masks, files, strict=True)
    ]
    headers = {
        "X-Credits-Charged": format_credits(charge.charged),
        "X-Segmentation-Found": str(result.found).lower(),
        "X-Mask-Candidates": ", ".join(
            f"<{url}>; score={mask.score:.4f}; coverage={mask.coverage:.4f}" for mask, url in candidates
        ),
        "Server-Timing": f"inference;dur={result.timing.inference_ms:.3f}, total;dur={(time.perf_counter() - started) * 1000:.3f}",
    }
    if "application/json" in request.headers.get("Accept", ""):
        data_items = [
            {
                "url": url,
                "b64_json": base64.b64encode(mask.image.data).decode("ascii"),
                "score": round(mask.score, 4),
                "coverage": round(mask.coverage, 4),
            }
            for mask, url in candidates
        ]
        return json_response(
            {"created": int(time.time()), "found": result.found, "data": data_items}, headers=headers
        )
    return _png(result.masks[0].image.data, "segmented_image.png", headers)


async def remove_image_background(request: web.Request) -> web.StreamResponse:
    """An RGBA PNG the size of the input, ``background_removed.png``."""
    credential_from(request)
    settings = request.app[SETTINGS]
    data, fields = await read_upload_form(request, field="file", what="an image")
    form = parse_form(BackgroundRemovalForm, fields)
    spec = _model(request, form.model)
    probe_image(data, max_pixels=settings.max_input_image_pixels, max_bytes=settings.max_input_image_bytes)
    prompt = form.prompt.strip()
    if not prompt:
        raise InvalidRequest("Missing required parameter: 'prompt' (the object to keep)")
    rules.check_prompt_length(prompt, max_chars=settings.max_prompt_chars)
    call = seg_pb.RemoveImageBackgroundRequest(
        image=data, prompt=prompt, request_id=request[REQUEST_ID], model=spec.id
    )

    async def work(auth: billing_pb.AuthorizeResponse) -> Done[seg_pb.RemoveImageBackgroundResponse]:
        result = await request.app[UPSTREAMS].segmentation.remove_background(call)
        return Done(result, [_usage(spec, 1)])

    async def answer(result: seg_pb.RemoveImageBackgroundResponse, charge: Charge) -> web.StreamResponse:
        headers = {
            "X-Credits-Charged": format_credits(charge.charged),
            "X-Segmentation-Found": str(result.found).lower(),
        }
        return _png(result.image.data, "background_removed.png", headers)

    return await billed(request, [_usage(spec, 1)], work, answer, dry_run=form.dry_run)


async def remove_video_background(request: web.Request) -> web.StreamResponse:
    """A WebM (VP9 with alpha) ``background_removed_video.webm``; see the module docstring."""
    credential = credential_from(request)
    settings = request.app[SETTINGS]
    if request.content_type != "multipart/form-data":
        raise InvalidRequest("Send the video as multipart/form-data with a 'file' field.")
    # The form's limits count for the whole request; the video has its own (413 above it).
    reader = FormReader(request, max_bytes=settings.max_video_bytes + settings.max_body_bytes)
    session: VideoSession | None = None
    entry: EntryHold | None = None
    dry_run = False
    try:
        fields: dict[str, str] = {}
        uploaded = 0
        digest = body_digest(request)
        async with contextlib.aclosing(reader.parts()) as parts:
            async for part in parts:
                name = part.name or ""
                if name == "file":
                    if not part.filename:
                        raise InvalidRequest("'file' must be a file upload")
                    if session is not None:
                        raise InvalidRequest("The field 'file' is given more than once")
                    # Nothing reaches the service before a hold is placed: the least this
                    # request can cost (one frame) is held until the probe prices the video.
                    # A dry run holds nothing: billing checks the credential instead, and the
                    # service only probes the video (its frame count is the price).
                    dry_run = dry_run_requested(request, _dry_run_field(fields))
                    usage = _usage(_model(request, fields.get("model")), 1)
                    if dry_run:
                        await request.app[UPSTREAMS].billing.authenticate(credential, request[REQUEST_ID])
                    else:
                        entry = await EntryHold.place(request, credential, usage)
                    session = request.app[UPSTREAMS].segmentation.video(request[REQUEST_ID])
                    note_part(request, name, part.filename, b"")
                    async for chunk in reader.chunks(part):
                        digest.update(chunk)
                        uploaded += len(chunk)
                        if uploaded > settings.max_video_bytes:
                            raise BodyRefused(
                                413,
                                f"The video is larger than the limit of {settings.max_video_bytes} bytes.",
                            )
                        await session.send_chunk(chunk)
                elif name in fields:
                    raise InvalidRequest(f"The field '{quoted(name)}' is given more than once")
                else:
                    fields[name] = await reader.text(part)
        if session is None or not uploaded:
            raise InvalidRequest("Missing required parameter: 'file' (a video upload)")
        form = parse_form(BackgroundRemovalForm, fields)
        if form.dry_run and not dry_run:  # the video went to the service as it arrived
            raise InvalidRequest("Give 'dry_run' before the 'file' part of the form, or as ?dry_run=true")
        prompt = form.prompt.strip()
        if not prompt:
            raise InvalidRequest("Missing required parameter: 'prompt' (the object to keep)")
        spec = _model(request, form.model)
        await session.send_job(seg_pb.VideoJob(prompt=prompt, model=spec.id, request_id=request[REQUEST_ID]))
        await session.finish_upload()
        event = await session.next_event()
        if not event.HasField("probe"):
            raise ProcessingError("The segmentation service answered out of order.")
        frames = event.probe.frames

        output = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)

        async def work(auth: billing_pb.AuthorizeResponse) -> Done[seg_pb.VideoSummary]:
            await session.start()
            while True:
                event = await session.next_event()
                kind = event.WhichOneof("event")
                if kind == "chunk":
                    output.write(event.chunk)
                elif kind == "summary":
                    break
            summary = event.summary
            return Done(summary, [_usage(spec, summary.frames_with_object)])

        async def answer(summary: seg_pb.VideoSummary, charge: Charge) -> web.StreamResponse:
            size = output.tell()
            output.seek(0)
            response = web.StreamResponse(
                headers={
                    "Content-Type": "video/webm",
                    "Content-Disposition": 'inline; filename="background_removed_video.webm"',
                    "Content-Length": str(size),
                    "X-Frames-Processed": str(summary.frames_processed),
                    "X-Frames-Charged": str(summary.frames_with_object),
                    "X-Credits-Charged": format_credits(charge.charged),
                }
            )
            await response.prepare(request)
            while chunk := output.read(CHUNK_BYTES):
                await response.write(chunk)
            await response.write_eof()
            return response

        if entry is not None:
            await entry.release()  # the hold of the whole video replaces it
        try:
            # The WebM is sent from a spooled file, not kept: never replayed for an Idempotency-Key.
            # A dry run answers the price of the probed frames here; the session is cancelled.
            return await billed(request, [_usage(spec, frames)], work, answer, streamed=True, dry_run=dry_run)
        finally:
            output.close()
    finally:
        if session is not None:
            session.cancel()
        if entry is not None:
            await entry.release()
