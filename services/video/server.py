"""The video gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the standard server (interceptors, health,
reflection) around :class:`VideoServiceServicer`; once started, a background
task loads the engines on their worker threads, and health turns SERVING as
soon as the default model (``turbodiffusion-wan2.2-i2v``) can serve. Health
keeps answering while the model loads and generates: all model work happens
off the event loop.

Settings used: ``KILN_VIDEO_ADDRESS`` (unless ``address`` is given),
``registry_path``, ``resolved_model_cache_dir``, ``torch_threads``,
``max_prompt_chars``, ``max_input_image_pixels``, ``max_input_image_bytes``
and ``grpc_max_message_bytes``.
"""

from __future__ import annotations

from kiln.video.v1 import video_service_pb2_grpc as pb_grpc
from services.common.decoding import DecodePool
from services.common.engine import EnginePool
from services.common.grpc_server import GrpcService, create_engine_server
from services.common.registry import DEFAULT_VIDEO_MODEL, Registry, load_registry
from services.common.settings import Settings
from services.video import CAPABILITY
from services.video.engines import build_engine_pool
from services.video.servicer import SERVICE_NAME, VideoServiceServicer


async def create_service(
    settings: Settings,
    *,
    address: str | None = None,
    registry: Registry | None = None,
    pool: EnginePool | None = None,
) -> GrpcService:
    """A bound, not yet started video server.

    ``registry`` defaults to ``settings.registry_path``; ``pool`` (the engines)
    to one engine per image-to-video model of the registry, with tiny models
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
            default=DEFAULT_VIDEO_MODEL,
        )
    servicer = VideoServiceServicer(
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
        add_to_server=pb_grpc.add_VideoServiceServicer_to_server,
        service_name=SERVICE_NAME,
        pool=pool,
        decoder=decoder,
    )
