"""``kiln.segmentation.v1.SegmentationService``: protobuf in, checks, SAM3 engine, protobuf out.

The servicer does no model work and no PyAV work on the event loop.

``SegmentImage`` decodes the image through
:func:`services.common.media.image.decode_image` in a decode worker process
(:class:`~services.common.decoding.DecodePool`; the configured
byte and pixel limits, and the model's ``max_width`` x ``max_height``), then
checks the request with :mod:`services.segmentation.rules`: a prompt or at
least one point; ``multimask_output`` only with points; every point inside
the image (``0 <= x < width``, ``0 <= y < height``; the error names the
point); at most :data:`~services.segmentation.rules.MAX_POINTS` points. The
engine answers with boolean masks; each is rendered
(:mod:`services.segmentation.render`: the object on transparency by default,
or a grey mask) and encoded as PNG on a worker thread, with its score and
coverage. A prompt that finds nothing gives ``found`` false and one empty
mask (a fully transparent cutout, or an all-black mask).

``RemoveImageBackground`` is a text-prompted segmentation whose answer is the
cutout: an RGBA PNG of the input's size, fully transparent when the object is
not found.

``RemoveVideoBackground`` follows the protocol in the proto: the client sends
the ``job``, the file's chunks and ``upload_complete`` (a task receives them
and spools the chunks, :class:`services.segmentation.video.UploadSpool`; the
job may come before or after the chunks); once the job is there, the service
sends the ``probe`` as soon as the container header is readable and then
waits, doing nothing more, until the client's ``start``; then output
chunks and progress stream back, and a ``summary`` ends the stream. Protocol
errors are ``InvalidRequest``: a stream without a job, a second job, ``start`` before the probe or twice, a chunk after ``upload_complete``,
a request stream that ends before ``start``. When the call is cancelled
(client gone, deadline) gRPC cancels this coroutine; closing the video
generator aborts the spool, which stops the job's thread, and frees the engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from contextlib import aclosing
from typing import Any, TypeVar

import grpc
from PIL import Image

from kiln.common.v1 import media_pb2
from kiln.segmentation.v1 import segmentation_service_pb2 as pb
from kiln.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from services.common.errors import InvalidRequest
from services.common.media.image import encode_image
from services.common.registry import DEFAULT_SEGMENTATION_MODEL, SEGMENTATION, ModelSpec
from services.common.runner import Progress
from services.common.servicer import EngineServicer
from services.common.video_decoding import UploadAborted, VideoProbe
from services.segmentation import rules
from services.segmentation.engines import Mask, PointPrompt, Sam3Engine, SegmentRequest, SegmentResult
from services.segmentation.render import CUTOUT, MASK, cutout, render
from services.segmentation.video import (
    UploadSpool,
    VideoSummary,
    remove_video_background,
)

T = TypeVar("T")

#: Full name of the service, for health and reflection.
SERVICE_NAME: str = pb.DESCRIPTOR.services_by_name["SegmentationService"].full_name

#: ``SegmentationOutput`` -> what the PNG shows.
OUTPUTS: dict[int, str] = {
    pb.SEGMENTATION_OUTPUT_UNSPECIFIED: CUTOUT,
    pb.SEGMENTATION_OUTPUT_CUTOUT: CUTOUT,
    pb.SEGMENTATION_OUTPUT_MASK: MASK,
}


def _png(image: Image.Image) -> media_pb2.Image:
    return media_pb2.Image(
        data=encode_image(image, "png"), mime_type="image/png", width=image.width, height=image.height
    )


def _timing(queue_ms: float, inference_ms: float, encode_ms: float) -> media_pb2.Timing:
    return media_pb2.Timing(queue_ms=queue_ms, inference_ms=inference_ms, encode_ms=encode_ms)


def _probe_to_proto(probe: VideoProbe) -> pb.VideoProbe:
    return pb.VideoProbe(
        frames=probe.frames,
        frame_rate=float(probe.frame_rate),
        width=probe.width,
        height=probe.height,
        duration_seconds=probe.duration_seconds,
    )


def _summary_to_proto(summary: VideoSummary) -> pb.VideoSummary:
    return pb.VideoSummary(
        frames_processed=summary.frames_processed,
        frames_with_object=summary.frames_with_object,
        model=summary.model,
        timing=_timing(summary.queue_ms, summary.inference_ms, summary.encode_ms),
    )


class SegmentationServicer(EngineServicer[Sam3Engine], pb_grpc.SegmentationServiceServicer):
    """Segmentation and background removal (images and videos) over gRPC."""

    # --- images ---

    async def SegmentImage(
        self, request: pb.SegmentImageRequest, context: grpc.aio.ServicerContext
    ) -> pb.SegmentImageResponse:
        spec = self.registry.resolve(request.model or None, SEGMENTATION, DEFAULT_SEGMENTATION_MODEL)
        kind = OUTPUTS.get(request.output)
        if kind is None:
            raise InvalidRequest(f"Unknown output {request.output}; use CUTOUT or MASK")
        prompt = self._prompt(request.prompt, required=False)
        rules.check_point_count(len(request.points))
        rules.check_prompt_or_points(prompt, len(request.points), multimask_output=request.multimask_output)
        engine = self._engine(spec)
        image = await self._decode(request.image, spec)
        points = self._points(request.points, image)
        result = await engine.result(
            SegmentRequest(image, prompt, points, request.multimask_output), request_id=request.request_id
        )
        masks, encode_ms = await self._render(image, result.masks, kind)
        return pb.SegmentImageResponse(
            masks=masks,
            found=result.found,
            model=result.model,
            timing=_timing(result.queue_ms, result.inference_ms, encode_ms),
        )

    async def RemoveImageBackground(
        self, request: pb.RemoveImageBackgroundRequest, context: grpc.aio.ServicerContext
    ) -> pb.RemoveImageBackgroundResponse:
        spec = self.registry.resolve(request.model or None, SEGMENTATION, DEFAULT_SEGMENTATION_MODEL)
        prompt = self._prompt(request.prompt, required=True)
        engine = self._engine(spec)
        image = await self._decode(request.image, spec)
        result: SegmentResult = await engine.result(
            SegmentRequest(image, prompt), request_id=request.request_id
        )
        best = result.masks[0]
        loop = asyncio.get_running_loop()
        started = loop.time()
        png = await asyncio.to_thread(lambda: _png(cutout(image, best.pixels)))
        return pb.RemoveImageBackgroundResponse(
            image=png,
            found=result.found,
            coverage=best.coverage,
            model=result.model,
            timing=_timing(result.queue_ms, result.inference_ms, (loop.time() - started) * 1000),
        )

    # --- video ---

    async def RemoveVideoBackground(
        self,
        request_iterator: AsyncIterator[pb.RemoveVideoBackgroundRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[pb.RemoveVideoBackgroundResponse]:
        spool = UploadSpool(max_bytes=self.settings.max_video_bytes)
        jobs: asyncio.Future[pb.VideoJob] = asyncio.get_running_loop().create_future()
        probed = asyncio.Event()
        started = asyncio.Event()
        receiver = asyncio.create_task(self._receive(aiter(request_iterator), spool, jobs, probed, started))
        try:
            job = await self._unless_receiver_fails(jobs, receiver, spool)
            prompt = self._prompt(job.prompt, required=True)
            spec = self.registry.resolve(job.model or None, SEGMENTATION, DEFAULT_SEGMENTATION_MODEL)
            rules.check_video_model(spec.id, max_frames=spec.limits.max_frames)
            engine = self._engine(spec)
            events = remove_video_background(
                spool,
                engine=engine,
                prompt=prompt,
                limits=spec.limits,
                request_id=job.request_id,
                decode_memory_bytes=self.decoder.memory_bytes,
            )
            async with aclosing(events):
                probe = await self._unless_receiver_fails(anext(events), receiver, spool)
                if not isinstance(probe, VideoProbe):
                    raise InvalidRequest("The video could not be probed")
                probed.set()
                yield pb.RemoveVideoBackgroundResponse(probe=_probe_to_proto(probe))
                await self._unless_receiver_fails(started.wait(), receiver, spool)
                async for event in events:
                    if receiver.done() and receiver.exception() is not None:
                        raise receiver.exception()  # type: ignore[misc]
                    if isinstance(event, bytes):
                        yield pb.RemoveVideoBackgroundResponse(chunk=event)
                    elif isinstance(event, Progress):
                        yield pb.RemoveVideoBackgroundResponse(
                            progress=media_pb2.Progress(step=event.step, total_steps=event.total_steps)
                        )
                    elif isinstance(event, VideoSummary):
                        yield pb.RemoveVideoBackgroundResponse(summary=_summary_to_proto(event))
        finally:
            receiver.cancel()
            spool.abort()
            await asyncio.gather(receiver, return_exceptions=True)
            await asyncio.to_thread(spool.close)

    async def _receive(
        self,
        requests: AsyncIterator[pb.RemoveVideoBackgroundRequest],
        spool: UploadSpool,
        jobs: asyncio.Future[pb.VideoJob],
        probed: asyncio.Event,
        started: asyncio.Event,
    ) -> None:
        """Spools the client's chunks, hands over the job, notes ``upload_complete`` and ``start``.

        The job may come before, between or after the chunks (a multipart form
        may carry the file before the prompt); the probe waits for it, since
        the model's limits depend on it. Raises on protocol errors.
        """
        try:
            async for message in requests:
                kind = message.WhichOneof("message")
                if kind == "chunk":
                    if message.chunk:
                        await asyncio.to_thread(spool.write, message.chunk)
                elif kind == "upload_complete":
                    if message.upload_complete:
                        spool.finish()
                elif kind == "job":
                    if jobs.done():
                        raise InvalidRequest("The job may be sent only once")
                    jobs.set_result(message.job)
                elif kind == "start":
                    if not probed.is_set():
                        raise InvalidRequest("'start' must follow the service's probe")
                    if started.is_set():
                        raise InvalidRequest("'start' was sent twice")
                    started.set()
                else:
                    raise InvalidRequest("An empty RemoveVideoBackground message")
        except UploadAborted:
            return  # the job is over; nothing more to receive
        spool.finish()  # the request stream ended: no more bytes will come
        if not jobs.done():
            raise InvalidRequest("The request stream ended without the job (prompt)")
        if not started.is_set():
            raise InvalidRequest("The request stream ended before 'start'")

    @staticmethod
    async def _unless_receiver_fails(
        awaitable: Awaitable[T], receiver: asyncio.Task[None], spool: UploadSpool
    ) -> T:
        """Awaits ``awaitable``; if the receiver fails first, aborts the spool and raises its error."""
        task = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({task, receiver}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and receiver.done():
                error = receiver.exception()
                if error is None:  # the stream ended normally; only waiting for start can get here
                    error = InvalidRequest("The request stream ended before 'start'")
                spool.abort()
                raise error
            return await task
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    # --- helpers ---

    def _engine(self, spec: ModelSpec) -> Sam3Engine:
        return self.pool.get(spec.id)

    def _prompt(self, prompt: str, *, required: bool) -> str:
        return rules.check_prompt(prompt, max_chars=self.settings.max_prompt_chars, required=required)

    @staticmethod
    def _points(points: Any, image: Image.Image) -> tuple[PointPrompt, ...]:
        width, height = image.size
        checked = []
        for number, point in enumerate(points, 1):
            x, y = float(point.x), float(point.y)
            rules.check_point(number, x, y, width=width, height=height)
            foreground = point.foreground if point.HasField("foreground") else True
            checked.append(PointPrompt(x, y, foreground))
        return tuple(checked)

    async def _decode(self, data: bytes, spec: ModelSpec) -> Image.Image:
        """Decodes the untrusted image in a decode worker process, within the settings' and the
        model's limits."""
        limits = spec.limits
        image: Image.Image = await self.decode_image(data)
        rules.check_image_size(
            image.width, image.height, model=spec.id, max_width=limits.max_width, max_height=limits.max_height
        )
        return image

    @staticmethod
    async def _render(
        image: Image.Image, masks: tuple[Mask, ...], kind: str
    ) -> tuple[list[pb.SegmentationMask], float]:
        loop = asyncio.get_running_loop()
        started = loop.time()

        def encode_all() -> list[pb.SegmentationMask]:
            return [
                pb.SegmentationMask(
                    image=_png(render(image, mask.pixels, kind)), score=mask.score, coverage=mask.coverage
                )
                for mask in masks
            ]

        rendered = await asyncio.to_thread(encode_all)
        return rendered, (loop.time() - started) * 1000
