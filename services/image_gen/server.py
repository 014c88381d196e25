"""The image_gen gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the server (standard interceptors, health,
reflection) around :class:`ImageServiceServicer`; once started, a background
task loads the engines on their worker threads, and health turns SERVING as
soon as the default model (z-image-turbo) can serve. Health keeps answering
while models load and while they generate, because all model work happens off
the event loop. ``kiln serve image_gen`` runs it alone, as a container does.
"""

from __future__ import annotations

import logging

from kiln.image.v1 import image_service_pb2_grpc as pb_grpc
from services.common.decoding import DecodePool
from services.common.engine import EnginePool
from services.common.grpc_server import GrpcService, create_engine_server
from services.common.registry import DEFAULT_IMAGE_MODEL, Registry, load_registry
from services.common.settings import Settings
from services.image_gen import CAPABILITY
from services.image_gen.engines import build_engine_pool
from services.image_gen.servicer import SERVICE_NAME, ImageServiceServicer

log = logging.getLogger(__name__)


async def create_service(
    settings: Settings,
    *,
    address: str | None = None,
    registry: Registry | None = None,
    pool: EnginePool | None = None,
) -> GrpcService:
    """A bound, not yet started image_gen server.

    ``registry`` defaults to ``settings.registry_path``; ``pool`` (the engines)
    to one engine per text-to-image or image-edit model of the registry, with tiny models
    built in ``settings.resolved_model_cache_dir``. The engines load in the
    background once the server starts, and close in its cleanup.
    """
    registry = registry or load_registry(settings.registry_path)
    decoder = DecodePool.from_settings(settings)
    if pool is None:
        pool = build_engine_pool(
            registry,
            cache_dir=settings.resolved_model_cache_dir,
            torch_threads=settings.torch_threads,
            default=DEFAULT_IMAGE_MODEL,
        )
    servicer = ImageServiceServicer(
        registry=registry,
        pool=pool,
        max_prompt_chars=settings.max_prompt_chars,
        max_input_image_pixels=settings.max_input_image_pixels,
        max_input_image_bytes=settings.max_input_image_bytes,
        decoder=decoder,
    )

    return await create_engine_server(
        address=address or settings.bind_address(settings.address(CAPABILITY.name)),
        settings=settings,
        servicer=servicer,
        add_to_server=pb_grpc.add_ImageServiceServicer_to_server,
        service_name=SERVICE_NAME,
        pool=pool,
        decoder=decoder,
    )
