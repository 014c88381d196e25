"""``POST /v1/images/img2video`` and ``GET /v1/images/user-videos``.

Image-to-video takes the contract's multipart form (an ``image`` file plus
text fields). The picture is checked from its header (format, pixels, bytes)
and the fields with the video service's own rules
(:func:`services.video.rules.video_params`) before anything is reserved; the
video service streams progress, then the MP4 in chunks, then a summary. The
MP4 is stored in the media store and recorded in
the caller's video library in the same transaction as the charge (billing's
``Commit``), so the library lists exactly the videos that were paid for. The
answer is JSON (the contract shows none): ``id``, ``url``, ``object``
("video"), ``model``, ``prompt``, ``num_frames``, ``fps``, ``width``,
``height``, ``duration``, ``size_bytes``, ``seed``, ``num_steps``,
``resolution``, ``use_ode``, ``credits_charged`` and ``timing``. With
``Accept: text/event-stream`` the answer is server-sent events instead: a
``progress`` event per denoising step (``{"step", "total_steps"}``), then
``result`` (that JSON, sent once the charge is committed) or ``error`` (the
envelope). Bad input still gets a plain 400 before any event. A client that
disconnects cancels the handler (the edge runs with handler cancellation),
which cancels the gRPC call, stops the job at its next step and releases the
hold.

The library lists the caller's own videos only (billing's ``ListMedia``
authenticates and filters by account): ``limit`` 1–100 (20), ``offset``,
``sortBy`` = ``newest`` | ``oldest`` (the contract's) or a field
(``created_at``, ``duration``, ``frames``, ``size_bytes``, ``width``,
``height``), ``sortOrder`` = ``asc`` | ``desc`` (``newest`` and fields default
to ``desc``, ``oldest`` to ``asc``; an explicit ``sortOrder`` wins).
"""

from __future__ import annotations

import contextlib
import time
from typing import Any

from aiohttp import web

from edge.flow import Charge, Done, MediaFile, billed, credential_from
from edge.forms import read_upload_form
from edge.handlers.images import media_base, timing_entry
from edge.keys import MEDIA, REGISTRY, REQUEST_ID, SETTINGS, UPSTREAMS
from edge.responses import ProgressEvents, json_response
from edge.schemas import ImageToVideoForm, parse_form
from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.video.v1 import video_service_pb2 as video_pb
from services.common.errors import InvalidRequest, KilnError, ProcessingError, envelope, quoted
from services.common.media.image import probe_image
from services.common.money import format_credits
from services.common.registry import DEFAULT_VIDEO_MODEL, IMAGE_TO_VIDEO
from services.video.rules import video_params

#: The library's kind of media record.
VIDEO = "video"
#: ``sortBy`` values -> (billing sort field, default descending).
SORTS: dict[str, tuple[str, bool]] = {
    "newest": ("created_at", True),
    "oldest": ("created_at", False),
    "created_at": ("created_at", True),
    "duration": ("duration_seconds", True),
    "frames": ("frames", True),
    "size_bytes": ("size_bytes", True),
    "width": ("width", True),
    "height": ("height", True),
}
MAX_PAGE = 100
#: Billing's offset is an int32.
MAX_OFFSET = 2**31 - 1


async def create_video(request: web.Request) -> web.StreamResponse:
    started = time.perf_counter()
    credential_from(request)
    settings = request.app[SETTINGS]
    image, fields = await read_upload_form(request, field="image", what="an image")
    form = parse_form(ImageToVideoForm, fields)
    probe_image(image, max_pixels=settings.max_input_image_pixels, max_bytes=settings.max_input_image_bytes)
    spec = request.app[REGISTRY].resolve(form.model, IMAGE_TO_VIDEO, DEFAULT_VIDEO_MODEL)
    video_params(  # the service checks again; a bad field is refused here before credits are held
        spec,
        prompt=form.prompt,
        negative_prompt=form.negative_prompt,
        num_frames=form.num_frames,
        steps=form.num_steps,
        resolution=form.resolution,
        use_ode=form.use_ode,
        guidance_scale=form.guidance_scale,
        seed=form.seed,
        max_prompt_chars=settings.max_prompt_chars,
    )
    call = video_pb.GenerateVideoRequest(
        model=spec.id,
        image=image,
        prompt=form.prompt,
        resolution=form.resolution,
        use_ode=form.use_ode,
        request_id=request[REQUEST_ID],
    )
    for name in ("negative_prompt", "num_frames", "num_steps", "seed", "guidance_scale"):
        value = getattr(form, name)
        if value is not None:
            setattr(call, name, value)
    usage = [billing_pb.Usage(video=billing_pb.VideoUsage(model=spec.id))]
    # With Accept: text/event-stream, progress goes out as server-sent events while the
    # video is made; the result (or an error) is the last event, sent after the charge.
    progress = ProgressEvents(request)

    media_id = request.app[MEDIA].new_id()

    async def work(auth: billing_pb.AuthorizeResponse) -> Done[tuple[dict[str, Any], video_pb.VideoSummary]]:
        chunks: list[bytes] = []
        summary: video_pb.VideoSummary | None = None
        events = request.app[UPSTREAMS].video.generate(call)
        async with contextlib.aclosing(events):  # leaving early cancels the call
            async for event in events:
                kind = event.WhichOneof("event")
                if kind == "progress":
                    await progress.step(event.progress.step, event.progress.total_steps)
                elif kind == "mp4_chunk":
                    chunks.append(event.mp4_chunk)
                elif kind == "summary":
                    summary = event.summary
        if summary is None:
            raise ProcessingError("The video service answered without a summary")
        data = b"".join(chunks)
        record = billing_pb.MediaRecord(
            media_id=media_id,
            kind=VIDEO,
            mime_type=summary.mime_type or "video/mp4",
            model=summary.model,
            prompt=form.prompt,
            width=summary.width,
            height=summary.height,
            frames=summary.num_frames,
            fps=summary.fps,
            duration_seconds=summary.duration_seconds,
            size_bytes=len(data),
        )
        entry = _video_entry(request, record, created_ms=int(time.time() * 1000))
        file = MediaFile(data, record.mime_type, media_id)
        return Done((entry, summary), usage, files=[file], records=[record])

    async def answer(
        done: tuple[dict[str, Any], video_pb.VideoSummary], charge: Charge
    ) -> web.StreamResponse:
        entry, summary = done
        body = {
            **entry,
            "seed": summary.seed,
            "num_steps": summary.num_steps,
            "resolution": summary.resolution,
            "use_ode": summary.use_ode,
            "credits_charged": format_credits(charge.charged),
            "timing": timing_entry(summary.timing, charge.store_seconds, started),
        }
        if progress.wanted:
            return await progress.finish(body)
        return json_response(body, headers={"X-Credits-Charged": body["credits_charged"]})

    try:
        return await billed(request, usage, work, answer, streamed=progress.wanted, dry_run=form.dry_run)
    except KilnError as err:
        ended = await progress.fail(envelope(err.message, err.error_type))
        if ended is None:
            raise
        return ended


async def list_user_videos(request: web.Request) -> web.Response:
    """The caller's videos, newest first unless asked otherwise, with the total count."""
    query = request.query
    limit = _int_param(query.get("limit", "20"), "limit")
    offset = _int_param(query.get("offset", "0"), "offset")
    if not 1 <= limit <= MAX_PAGE:
        raise InvalidRequest(f"'limit' must be between 1 and {MAX_PAGE}, not {quoted(str(limit))}")
    if offset < 0:
        raise InvalidRequest(f"'offset' must not be negative, not {quoted(str(offset))}")
    if offset > MAX_OFFSET:
        raise InvalidRequest(f"'offset' must be at most {MAX_OFFSET}, not {quoted(str(offset))}")
    sort_by = query.get("sortBy", "newest")
    if sort_by not in SORTS:
        raise InvalidRequest(
            f"Invalid value for 'sortBy': '{quoted(sort_by)}'. Use one of: {', '.join(SORTS)}"
        )
    field, descending = SORTS[sort_by]
    order = query.get("sortOrder")
    if order is not None:
        if order not in ("asc", "desc"):
            raise InvalidRequest(f"Invalid value for 'sortOrder': '{quoted(order)}'. Use 'asc' or 'desc'")
        descending = order == "desc"
    listing = await request.app[UPSTREAMS].billing.list_media(
        billing_pb.ListMediaRequest(
            credential=credential_from(request),
            kind=VIDEO,
            limit=limit,
            offset=offset,
            sort_by=field,
            ascending=not descending,
        ),
        request[REQUEST_ID],
    )
    return json_response(
        {
            "object": "list",
            "data": [
                _video_entry(request, record, created_ms=record.created_at_ms) for record in listing.media
            ],
            "total": listing.total,
            "limit": limit,
            "offset": offset,
            "has_more": offset + len(listing.media) < listing.total,
        }
    )


def _video_entry(request: web.Request, record: billing_pb.MediaRecord, *, created_ms: int) -> dict[str, Any]:
    return {
        "id": record.media_id,
        "object": "video",
        "url": f"{media_base(request)}/v1/media/{record.media_id}",
        "model": record.model,
        "prompt": record.prompt,
        "created": created_ms // 1000,
        "created_at_ms": created_ms,
        "num_frames": record.frames,
        "fps": record.fps,
        "width": record.width,
        "height": record.height,
        "duration": record.duration_seconds,
        "size_bytes": record.size_bytes,
        "content_type": record.mime_type,
    }


def _int_param(value: str, name: str) -> int:
    try:
        return int(value)
    except ValueError:
        raise InvalidRequest(f"Invalid value for '{name}': '{quoted(value)}' is not an integer") from None
