"""The edge's gRPC clients. Every failed call surfaces as a KilnError (via error_from_rpc)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass
from typing import TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.billing.v1 import billing_service_pb2 as billing_pb
from kiln.billing.v1 import billing_service_pb2_grpc as billing_grpc
from kiln.image.v1 import image_service_pb2 as image_pb
from kiln.image.v1 import image_service_pb2_grpc as image_grpc
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


def generation_request(params: GenerationParams, request_id: str) -> image_pb.GenerateImagesRequest:
    """The image_gen request for checked parameters (every default already filled)."""
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
    )
    if params.seed is not None:
        request.seed = params.seed
    return request


class ImageGenClient:
    """Text-to-image over the streaming RPC."""

    def __init__(self, channel: grpc.aio.Channel, *, timeout: float) -> None:
        self._stub = image_grpc.ImageServiceStub(channel)
        self._timeout = timeout

    async def stream(
        self, request: image_pb.GenerateImagesRequest
    ) -> AsyncIterator[image_pb.GenerateImagesResponse]:
        """Progress events, then the result. Cancelling the iteration cancels the call."""
        call = self._stub.GenerateImages(
            request, timeout=self._timeout, metadata=_metadata(request.request_id)
        )
        try:
            async for event in call:
                yield event
        except grpc.aio.AioRpcError as err:
            raise error_from_rpc(err) from None
        finally:
            call.cancel()

    async def generate(self, request: image_pb.GenerateImagesRequest) -> image_pb.GeneratedImages:
        """The final result of a generation (progress events are skipped)."""
        async for event in self.stream(request):
            if event.HasField("result"):
                return event.result
        raise grpc.aio.AioRpcError(
            grpc.StatusCode.INTERNAL,
            grpc.aio.Metadata(),
            grpc.aio.Metadata(),
            "stream ended without a result",
        )


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
