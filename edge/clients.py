"""The edge's gRPC clients. Every failed call surfaces as a KilnError (via error_from_rpc)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.billing.v1 import billing_service_pb2_grpc as billing_grpc
from kiln.common.v1 import media_pb2 as media_pb
from kiln.image.v1 import image_service_pb2 as image_pb
from kiln.image.v1 import image_service_pb2_grpc as image_grpc
from services.common.errors import ProcessingError
from services.common.grpc_client import create_channel, error_from_rpc
from services.common.registry import GenerationParams

T = TypeVar("T")


async def _call(awaitable: Awaitable[T]) -> T:
    try:
        return await awaitable
    except grpc.aio.AioRpcError as err:
        raise error_from_rpc(err) from None


def _metadata(request_id: str) -> tuple[tuple[str, str], ...]:
    return (("x-request-id", request_id),)


class BillingClient:
    """Authorize before the work, commit or release after it."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float = 10.0) -> None:
        self._stub = billing_grpc.BillingServiceStub(channel)
        self._timeout = timeout

    async def authorize(
        self, credential: billing_pb.Credential, usage: list[billing_pb.Usage], request_id: str
    ) -> billing_pb.AuthorizeResponse:
        request = billing_pb.AuthorizeRequest(credential=credential, usage=usage, request_id=request_id)
        return await _call(
            self._stub.Authorize(request, timeout=self._timeout, metadata=_metadata(request_id))
        )

    async def authenticate(self, credential: billing_pb.Credential, request_id: str) -> billing_pb.Account:
        response = await _call(
            self._stub.Authenticate(
                billing_pb.AuthenticateRequest(credential=credential),
                timeout=self._timeout,
                metadata=_metadata(request_id),
            )
        )
        return response.account

    async def commit(self, reservation_id: str, amount: int, request_id: str) -> None:
        request = billing_pb.CommitRequest(reservation_id=reservation_id, amount_hundredths=amount)
        await _call(self._stub.Commit(request, timeout=self._timeout, metadata=_metadata(request_id)))

    async def release(self, reservation_id: str, request_id: str) -> None:
        request = billing_pb.ReleaseRequest(reservation_id=reservation_id)
        await _call(self._stub.Release(request, timeout=self._timeout, metadata=_metadata(request_id)))


FORMATS = {
    "png": media_pb.IMAGE_FORMAT_PNG,
    "jpeg": media_pb.IMAGE_FORMAT_JPEG,
    "webp": media_pb.IMAGE_FORMAT_WEBP,
}


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
        output_format=FORMATS[params.output_format],
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
        output_format=FORMATS[params.output_format],
        embed_metadata=params.embed_metadata,
        mask=params.mask,
    )
    if params.seed is not None:
        request.seed = params.seed
    return request


class ImageGenClient:
    """Text-to-image and edits over the streaming RPCs."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float) -> None:
        self._stub = image_grpc.ImageServiceStub(channel)
        self._timeout = timeout

    async def run(self, params: GenerationParams, request_id: str) -> image_pb.GeneratedImages:
        """The final result of a generation or edit (progress events are skipped).

        Cancelling the caller cancels the call, which stops the model at its next step.
        """
        metadata = _metadata(request_id)
        call: grpc.aio.UnaryStreamCall
        if params.inputs:
            call = self._stub.EditImages(
                edit_request(params, request_id), timeout=self._timeout, metadata=metadata
            )
        else:
            call = self._stub.GenerateImages(
                generation_request(params, request_id), timeout=self._timeout, metadata=metadata
            )
        try:
            async for event in call:
                if event.HasField("result"):
                    return event.result
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()
        raise ProcessingError("The image service ended the stream without a result.")


@dataclass
class Upstreams:
    """The edge's channels and clients, opened and closed with the app."""

    billing_channel: grpc.aio.Channel
    image_channel: grpc.aio.Channel
    billing: BillingClient
    images: ImageGenClient

    @classmethod
    def connect(
        cls, *, billing_address: str, image_address: str, max_message_bytes: int, timeout: float
    ) -> Upstreams:
        billing_channel = create_channel(billing_address, max_message_bytes=max_message_bytes)
        image_channel = create_channel(image_address, max_message_bytes=max_message_bytes)
        return cls(
            billing_channel=billing_channel,
            image_channel=image_channel,
            billing=BillingClient(billing_channel),
            images=ImageGenClient(image_channel, timeout=timeout),
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

        billing_ok, image_ok = await asyncio.gather(check(self.billing_channel), check(self.image_channel))
        return {"billing": billing_ok, "image_gen": image_ok}

    async def close(self) -> None:
        await self.billing_channel.close()
        await self.image_channel.close()
