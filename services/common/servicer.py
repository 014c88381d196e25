"""What every capability's servicer is built from, and the base class they share.

A servicer converts between protobuf and engine types and enforces the
``max_*`` input limits of the settings; it does no tensor work (engines do)
and no server wiring (:class:`services.common.grpc_server.EngineService` does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Generic

from PIL import Image

from services.common.decoding import DecodePool
from services.common.engine import EnginePool, EngineT
from services.common.media.image import decode_image
from services.common.registry import Registry
from services.common.settings import Settings


@dataclass(frozen=True)
class ServiceParts(Generic[EngineT]):
    """What a capability's servicer is built from."""

    registry: Registry
    pool: EnginePool[EngineT]
    decoder: DecodePool
    settings: Settings


class EngineServicer(Generic[EngineT]):
    """The base of every capability's servicer: the registry, the engine pool, the decode
    workers and the settings (whose ``max_*`` limits the servicer enforces)."""

    def __init__(self, parts: ServiceParts[EngineT]) -> None:
        self.registry = parts.registry
        self.pool = parts.pool
        self.decoder = parts.decoder
        self.settings = parts.settings

    async def decode_image(self, data: bytes, what: str = "The image") -> Image.Image:
        """Decodes an untrusted input image in a decode worker, within the input image limits."""
        image: Image.Image = await self.decoder.run(
            what,
            decode_image,
            data,
            max_pixels=self.settings.max_input_image_pixels,
            max_bytes=self.settings.max_input_image_bytes,
        )
        return image
