"""The segmentation gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the server (standard interceptors, health,
reflection) around :class:`SegmentationServicer`; once started, a background
task loads the SAM3 engines on their worker threads, and health turns SERVING
as soon as the default model (sam3) can serve.

The address is ``address`` when given, else the ``KILN_SEGMENTATION_ADDRESS``
setting; the largest video upload is the ``max_video_bytes`` setting.
"""

from __future__ import annotations

import logging

from kiln.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from services.common.decoding import DecodePool
from services.common.engine import EnginePool
from services.common.grpc_server import GrpcService, create_engine_server
from services.common.registry import DEFAULT_SEGMENTATION_MODEL, Registry, load_registry
from services.common.settings import Settings
from services.segmentation import CAPABILITY
from services.segmentation.engines import build_engine_pool
from services.segmentation.servicer import SERVICE_NAME, SegmentationServicer

log = logging.getLogger(__name__)

#: Where the service listens when neither ``address`` nor a setting says otherwise.


async def create_service(
    settings: Settings,
    *,
    address: str | None = None,
    registry: Registry | None = None,
    pool: EnginePool | None = None,
) -> GrpcService:
    """A bound, not yet started segmentation server.

    ``registry`` defaults to ``settings.registry_path``; ``pool`` to one engine
    per segmentation model of the registry, with tiny models built in
    ``settings.resolved_model_cache_dir``. The engines load in the background
    once the server starts, and close in its cleanup.
    """
    registry = registry or load_registry(settings.registry_path)
    decoder = DecodePool.from_settings(settings)
    if pool is None:
        pool = build_engine_pool(
            registry,
            cache_dir=settings.resolved_model_cache_dir,
            torch_threads=settings.torch_threads,
            default=DEFAULT_SEGMENTATION_MODEL,
        )
    servicer = SegmentationServicer(
        registry=registry,
        pool=pool,
        max_prompt_chars=settings.max_prompt_chars,
        max_input_image_pixels=settings.max_input_image_pixels,
        max_input_image_bytes=settings.max_input_image_bytes,
        max_video_bytes=settings.max_video_bytes,
        decoder=decoder,
    )

    return await create_engine_server(
        address=address or settings.bind_address(settings.address(CAPABILITY.name)),
        settings=settings,
        servicer=servicer,
        add_to_server=pb_grpc.add_SegmentationServiceServicer_to_server,
        service_name=SERVICE_NAME,
        pool=pool,
        decoder=decoder,
    )
