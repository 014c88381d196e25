"""The edge's gRPC clients. Every failed call surfaces as a KilnError (via error_from_rpc)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.billing.v1 import billing_service_pb2_grpc as billing_grpc
from kiln.billing.v1 import task_service_pb2_grpc as task_grpc
from kiln.image.v1 import image_service_pb2 as image_pb
from kiln.image.v1 import image_service_pb2_grpc as image_grpc
from kiln.llm.v1 import llm_service_pb2 as llm_pb
from kiln.llm.v1 import llm_service_pb2_grpc as llm_grpc
from kiln.music.v1 import music_service_pb2 as music_pb
from kiln.music.v1 import music_service_pb2_grpc as music_grpc
from kiln.segmentation.v1 import segmentation_service_pb2 as seg_pb
from kiln.segmentation.v1 import segmentation_service_pb2_grpc as seg_grpc
from kiln.tts.v1 import tts_service_pb2 as tts_pb
from kiln.tts.v1 import tts_service_pb2_grpc as tts_grpc
from kiln.upscale.v1 import upscale_service_pb2 as upscale_pb
from kiln.upscale.v1 import upscale_service_pb2_grpc as upscale_grpc
from kiln.video.v1 import video_service_pb2 as video_pb
from kiln.video.v1 import video_service_pb2_grpc as video_grpc
from services.catalog import CATALOG
from services.common.admission import caller_metadata
from services.common.errors import ProcessingError
from services.common.grpc_client import create_channel, error_from_rpc
from services.common.mesh_auth import EDGE, METADATA_KEY, mesh_secret, mesh_token
from services.common.proto_enums import IMAGE_FORMATS
from services.common.settings import Settings
from services.image_gen.rules import GenerationParams

T = TypeVar("T")


async def _call(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except grpc.aio.AioRpcError as err:
        raise error_from_rpc(err) from None


async def _events(call: Any) -> AsyncGenerator[Any]:
    """A server stream's messages as they arrive. A failed call raises its KilnError;
    closing the generator (leaving the iteration) cancels the call."""
    try:
        async for event in call:
            yield event
    except grpc.aio.AioRpcError as err:
        raise error_from_rpc(err) from None
    finally:
        call.cancel()


class _Client:
    """A service's stub, its call deadline, and the metadata of every call: the request id, the
    caller's account and the edge's mesh credential (per call, not a channel interceptor:
    grpc.aio runs each intercepted call in a task of its own, a cost on every request)."""

    def __init__(self, stub: Any, *, timeout: float, token: str) -> None:
        self._stub = stub
        self._timeout = timeout
        self._auth = (METADATA_KEY, f"Bearer {token}")

    def _metadata(self, request_id: str) -> tuple[tuple[str, str], ...]:
        # ... and the account the request is for, once the billed flow knows it (x-kiln-account,
        # x-kiln-tier: services.common.admission), which the engines' fair queues admit by.
        return (("x-request-id", request_id), self._auth, *caller_metadata())

    def _stream(self, method: Any, request: Any) -> AsyncGenerator[Any]:
        """Starts a server-streaming ``method`` (a stub attribute) for ``request``, with the call
        timeout and the metadata, and reads it with :func:`_events`."""
        return _events(method(request, timeout=self._timeout, metadata=self._metadata(request.request_id)))


class BillingClient(_Client):
    """Authorize before the work, commit or release after it."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        super().__init__(billing_grpc.BillingServiceStub(channel), timeout=timeout, token=token)

    async def authorize(
        self,
        credential: billing_pb.Credential,
        usage: Sequence[billing_pb.Usage],
        request_id: str,
        *,
        ttl_seconds: int = 0,
        idempotency: billing_pb.IdempotencyKey | None = None,
    ) -> billing_pb.AuthorizeResponse:
        request = billing_pb.AuthorizeRequest(
            credential=credential,
            usage=usage,
            request_id=request_id,
            ttl_seconds=ttl_seconds,
            idempotency=idempotency,
        )
        return await _call(
            self._stub.Authorize(request, timeout=self._timeout, metadata=self._metadata(request_id))
        )

    async def authenticate(self, credential: billing_pb.Credential, request_id: str) -> billing_pb.Account:
        response = await _call(
            self._stub.Authenticate(
                billing_pb.AuthenticateRequest(credential=credential),
                timeout=self._timeout,
                metadata=self._metadata(request_id),
            )
        )
        return response.account

    async def authenticate_session(
        self, session_token: str, request_id: str
    ) -> billing_pb.AuthenticateResponse:
        """The account and session of a session token (GET /v1/session)."""
        return await _call(
            self._stub.Authenticate(
                billing_pb.AuthenticateRequest(credential=billing_pb.Credential(session_token=session_token)),
                timeout=self._timeout,
                metadata=self._metadata(request_id),
            )
        )

    async def sign_in(
        self, name: str, password: str, client_address: str, request_id: str
    ) -> billing_pb.SignInResponse:
        request = billing_pb.SignInRequest(name=name, password=password, client_address=client_address)
        return await _call(
            self._stub.SignIn(request, timeout=self._timeout, metadata=self._metadata(request_id))
        )

    async def sign_out(self, session_token: str, request_id: str) -> bool:
        response = await _call(
            self._stub.SignOut(
                billing_pb.SignOutRequest(session_token=session_token),
                timeout=self._timeout,
                metadata=self._metadata(request_id),
            )
        )
        return response.revoked

    async def quote(
        self, usage: Sequence[billing_pb.Usage], account_id: str, request_id: str
    ) -> billing_pb.QuoteResponse:
        """What ``usage`` costs ``account_id`` (premium pays 0), priced as Authorize would hold it;
        nothing is held."""
        request = billing_pb.QuoteRequest(account_id=account_id, usage=usage)
        return await _call(
            self._stub.Quote(request, timeout=self._timeout, metadata=self._metadata(request_id))
        )

    async def commit(
        self,
        reservation_id: str,
        usage: Sequence[billing_pb.Usage],
        media: Sequence[billing_pb.MediaRecord],
        request_id: str,
    ) -> billing_pb.Reservation:
        """Charges what billing prices ``usage`` at (capped at the hold); ``media`` are
        recorded for the account in the same transaction. Returns the committed hold."""
        request = billing_pb.CommitRequest(reservation_id=reservation_id, usage=usage, media=media)
        response = await _call(
            self._stub.Commit(request, timeout=self._timeout, metadata=self._metadata(request_id))
        )
        return response.reservation

    async def get_reservation(self, reservation_id: str, request_id: str) -> billing_pb.Reservation:
        request = billing_pb.GetReservationRequest(reservation_id=reservation_id)
        response = await _call(
            self._stub.GetReservation(request, timeout=self._timeout, metadata=self._metadata(request_id))
        )
        return response.reservation

    async def save_response(
        self, reservation_id: str, response: billing_pb.StoredResponse, request_id: str
    ) -> bool:
        request = billing_pb.SaveResponseRequest(reservation_id=reservation_id, response=response)
        reply = await _call(
            self._stub.SaveResponse(request, timeout=self._timeout, metadata=self._metadata(request_id))
        )
        return bool(reply.saved)

    async def list_media(
        self, request: billing_pb.ListMediaRequest, request_id: str
    ) -> billing_pb.ListMediaResponse:
        return await _call(
            self._stub.ListMedia(request, timeout=self._timeout, metadata=self._metadata(request_id))
        )

    async def sweep_media(
        self, request: billing_pb.SweepMediaRequest, request_id: str
    ) -> billing_pb.SweepMediaResponse:
        """Media retention (``edge.retention``): expires records, finds files never paid for."""
        return await _call(
            self._stub.SweepMedia(request, timeout=self._timeout, metadata=self._metadata(request_id))
        )

    async def release(self, reservation_id: str, request_id: str) -> None:
        request = billing_pb.ReleaseRequest(reservation_id=reservation_id)
        await _call(self._stub.Release(request, timeout=self._timeout, metadata=self._metadata(request_id)))


def generation_request(params: GenerationParams, request_id: str) -> image_pb.GenerateImagesRequest:
    """The image_gen request for checked parameters (every default filled, the style applied)."""
    request = image_pb.GenerateImagesRequest(
        model=params.model.id,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        width=params.width,
        height=params.height,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        count=params.count,
        request_id=request_id,
        output_format=IMAGE_FORMATS[params.output_format],
        embed_metadata=params.embed_metadata,
    )
    if params.seed is not None:
        request.seed = params.seed
    return request


def edit_request(params: GenerationParams, request_id: str) -> image_pb.EditImagesRequest:
    """The EditImages request for checked edit parameters (output size already decided)."""
    request = image_pb.EditImagesRequest(
        model=params.model.id,
        prompt=params.prompt,
        negative_prompt=params.negative_prompt,
        input_images=list(params.inputs),
        width=params.width,
        height=params.height,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        count=params.count,
        request_id=request_id,
        output_format=IMAGE_FORMATS[params.output_format],
        embed_metadata=params.embed_metadata,
        mask=params.mask,
    )
    if params.seed is not None:
        request.seed = params.seed
    return request


class TaskClient(_Client):
    """Billing's task queue (``kiln.billing.v1.TaskService``, see services.billing.tasks)."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        super().__init__(task_grpc.TaskServiceStub(channel), timeout=timeout, token=token)

    async def call(self, method: str, request: Any, request_id: str = "") -> Any:
        """One unary ``method`` of the service (e.g. ``"GetTask"``) with ``request``."""
        rpc = getattr(self._stub, method)
        return await _call(rpc(request, timeout=self._timeout, metadata=self._metadata(request_id)))


class ImageGenClient(_Client):
    """Text-to-image and edits over the streaming RPCs."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        super().__init__(image_grpc.ImageServiceStub(channel), timeout=timeout, token=token)

    async def run(
        self,
        params: GenerationParams,
        request_id: str,
        on_progress: Callable[[int, int], Awaitable[None]] | None = None,
    ) -> image_pb.GeneratedImages:
        """The final result of a generation or edit; ``on_progress(step, total)`` hears each
        finished step.

        Cancelling the caller cancels the call, which stops the model at its next step.
        """
        metadata = self._metadata(request_id)
        call: grpc.aio.UnaryStreamCall
        if params.inputs:
            call = self._stub.EditImages(
                edit_request(params, request_id), timeout=self._timeout, metadata=metadata
            )
        else:
            call = self._stub.GenerateImages(
                generation_request(params, request_id), timeout=self._timeout, metadata=metadata
            )
        async with contextlib.aclosing(_events(call)) as events:
            async for event in events:
                if event.HasField("result"):
                    return cast(image_pb.GeneratedImages, event.result)
                if on_progress is not None and event.HasField("progress"):
                    await on_progress(event.progress.step, event.progress.total_steps)
        raise ProcessingError("The image service ended the stream without a result.")


class SegmentationClient(_Client):
    """Segmentation and background removal; video through the bidirectional stream."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        super().__init__(seg_grpc.SegmentationServiceStub(channel), timeout=timeout, token=token)

    async def segment(self, request: seg_pb.SegmentImageRequest) -> seg_pb.SegmentImageResponse:
        return await _call(
            self._stub.SegmentImage(
                request, timeout=self._timeout, metadata=self._metadata(request.request_id)
            )
        )

    async def remove_background(
        self, request: seg_pb.RemoveImageBackgroundRequest
    ) -> seg_pb.RemoveImageBackgroundResponse:
        return await _call(
            self._stub.RemoveImageBackground(
                request, timeout=self._timeout, metadata=self._metadata(request.request_id)
            )
        )

    def video(self, request_id: str) -> VideoSession:
        call = self._stub.RemoveVideoBackground(timeout=self._timeout, metadata=self._metadata(request_id))
        return VideoSession(call)


class UpscaleClient(_Client):
    """Super-resolution; the service batches concurrent requests itself."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        super().__init__(upscale_grpc.UpscaleServiceStub(channel), timeout=timeout, token=token)

    async def upscale(self, request: upscale_pb.UpscaleImageRequest) -> upscale_pb.UpscaleImageResponse:
        return await _call(
            self._stub.UpscaleImage(
                request, timeout=self._timeout, metadata=self._metadata(request.request_id)
            )
        )


class LlmClient(_Client):
    """Chat over the server-streaming RPC."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        super().__init__(llm_grpc.LlmServiceStub(channel), timeout=timeout, token=token)

    def chat(self, request: llm_pb.ChatRequest) -> AsyncGenerator[llm_pb.ChatResponse]:
        """Start, deltas as they are produced, end. Leaving the iteration cancels the call."""
        return self._stream(self._stub.Chat, request)


class TtsClient(_Client):
    """Speech and voice cloning over the server-streaming RPCs."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        super().__init__(tts_grpc.TtsServiceStub(channel), timeout=timeout, token=token)

    def synthesize(self, request: tts_pb.SynthesizeRequest) -> AsyncGenerator[tts_pb.SynthesizeResponse]:
        """Header, PCM chunks as they are produced, summary. Leaving the iteration cancels the call."""
        return self._stream(self._stub.Synthesize, request)

    def clone(self, request: tts_pb.CloneVoiceRequest) -> AsyncGenerator[tts_pb.CloneVoiceResponse]:
        """Header, PCM chunks as the codec frames are decoded, summary (as :meth:`synthesize`)."""
        return self._stream(self._stub.CloneVoice, request)

    async def voices(self) -> tts_pb.ListVoicesResponse:
        return await _call(
            self._stub.ListVoices(
                tts_pb.ListVoicesRequest(), timeout=self._timeout, metadata=self._metadata("-")
            )
        )


class MusicClient(_Client):
    """Music generation, cover and repaint over the server-streaming RPCs."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        super().__init__(music_grpc.MusicServiceStub(channel), timeout=timeout, token=token)

    def generate(
        self, request: music_pb.GenerateMusicRequest
    ) -> AsyncGenerator[music_pb.GenerateMusicResponse]:
        """Progress, the result (format, seed, timing), then PCM chunks."""
        return self._stream(self._stub.GenerateMusic, request)

    def cover(self, request: music_pb.CoverMusicRequest) -> AsyncGenerator[music_pb.CoverMusicResponse]:
        return self._stream(self._stub.CoverMusic, request)

    def repaint(self, request: music_pb.RepaintMusicRequest) -> AsyncGenerator[music_pb.RepaintMusicResponse]:
        return self._stream(self._stub.RepaintMusic, request)


class VideoClient(_Client):
    """Image-to-video over the server-streaming RPC."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float, token: str) -> None:
        super().__init__(video_grpc.VideoServiceStub(channel), timeout=timeout, token=token)

    def generate(
        self, request: video_pb.GenerateVideoRequest
    ) -> AsyncGenerator[video_pb.GenerateVideoResponse]:
        """Progress, the MP4 in chunks, then the summary. Leaving the iteration cancels the call."""
        return self._stream(self._stub.GenerateVideo, request)


class VideoSession:
    """The client side of RemoveVideoBackground: upload, probe, start, then events."""

    def __init__(self, call: grpc.aio.StreamStreamCall) -> None:
        self._call = call

    async def _write(self, message: seg_pb.RemoveVideoBackgroundRequest) -> None:
        try:
            await self._call.write(message)
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        except asyncio.InvalidStateError:  # the service already ended the call (with an error)
            await self._raise_status()

    async def _raise_status(self) -> None:
        try:  # a finished call's read raises its status (a stream-stream call cannot be awaited)
            while await self._call.read() is not grpc.aio.EOF:
                pass
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        raise ProcessingError("The segmentation service ended the video call early.")

    async def send_job(self, job: seg_pb.VideoJob) -> None:
        await self._write(seg_pb.RemoveVideoBackgroundRequest(job=job))

    async def send_chunk(self, chunk: bytes) -> None:
        await self._write(seg_pb.RemoveVideoBackgroundRequest(chunk=chunk))

    async def finish_upload(self) -> None:
        await self._write(seg_pb.RemoveVideoBackgroundRequest(upload_complete=True))

    async def start(self) -> None:
        await self._write(seg_pb.RemoveVideoBackgroundRequest(start=seg_pb.StartProcessing()))
        await self._call.done_writing()

    async def next_event(self) -> seg_pb.RemoveVideoBackgroundResponse:
        try:
            message = await self._call.read()
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        if message is grpc.aio.EOF:
            await self._raise_status()
        return cast(seg_pb.RemoveVideoBackgroundResponse, message)

    def cancel(self) -> None:
        self._call.cancel()


@dataclass
class Upstreams:
    """The edge's channels and clients, opened and closed with the app."""

    channels: dict[str, grpc.aio.Channel]
    billing: BillingClient
    tasks: TaskClient
    images: ImageGenClient
    segmentation: SegmentationClient
    upscale: UpscaleClient
    llm: LlmClient
    tts: TtsClient
    music: MusicClient
    video: VideoClient

    @classmethod
    def connect(cls, settings: Settings) -> Upstreams:
        channels = {  # one per service of the catalog: /readyz checks them all
            entry.name: create_channel(
                settings.address(entry.name), max_message_bytes=settings.grpc_max_message_bytes
            )
            for entry in CATALOG
        }
        token = mesh_token(mesh_secret(settings), EDGE)
        timeout = settings.service_timeout_seconds
        return cls(
            channels=channels,
            billing=BillingClient(channels["billing"], timeout=settings.billing_timeout_seconds, token=token),
            tasks=TaskClient(channels["billing"], timeout=settings.billing_timeout_seconds, token=token),
            images=ImageGenClient(channels["image_gen"], timeout=timeout, token=token),
            segmentation=SegmentationClient(channels["segmentation"], timeout=timeout, token=token),
            upscale=UpscaleClient(channels["upscale"], timeout=timeout, token=token),
            llm=LlmClient(channels["llm"], timeout=timeout, token=token),
            tts=TtsClient(channels["tts"], timeout=timeout, token=token),
            music=MusicClient(channels["music"], timeout=timeout, token=token),
            video=VideoClient(channels["video"], timeout=timeout, token=token),
        )

    async def health(self, deadline_seconds: float = 2.0) -> dict[str, bool]:
        """Whether each upstream answers its health check with SERVING."""

        async def check(channel: grpc.aio.Channel) -> bool:
            try:
                response = await health_pb2_grpc.HealthStub(channel).Check(
                    health_pb2.HealthCheckRequest(service=""), timeout=deadline_seconds
                )
            except grpc.aio.AioRpcError:
                return False
            return bool(response.status == health_pb2.HealthCheckResponse.SERVING)

        results = await asyncio.gather(*(check(channel) for channel in self.channels.values()))
        return dict(zip(self.channels, results, strict=True))

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()
