"""The upscale gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the server (standard interceptors, health,
reflection) around :class:`UpscaleServicer`; once started, a background task
loads the engines on their worker threads (converting the Real-ESRGAN weights
and exporting the ONNX models on first start, into the model cache), and
health turns SERVING as soon as the default method (``realesrgan_4x``) can
serve.

Settings used: ``KILN_UPSCALE_ADDRESS`` (unless ``address`` is given),
``engine_backend``, ``batch_max_size``, ``batch_window_ms``,
``torch_threads``, ``resolved_model_cache_dir``, ``max_input_image_pixels``,
``max_input_image_bytes`` and ``grpc_max_message_bytes``.
"""

from __future__ import annotations

from kiln.upscale.v1 import upscale_service_pb2_grpc as pb_grpc
from services.common.decoding import DecodePool
from services.common.engine import EnginePool
from services.common.grpc_server import GrpcService, create_engine_server
from services.common.registry import Registry, load_registry
from services.common.settings import Settings
from services.upscale import CAPABILITY
from services.upscale.engines import AUTO_GPU_BATCH, DEFAULT_UPSCALE_METHOD, EngineOptions, build_engine_pool
from services.upscale.servicer import SERVICE_NAME, UpscaleServicer


def engine_options(settings: Settings, *, batching: bool = True) -> EngineOptions:
    """The engines' backend and batching settings."""
    return EngineOptions(
        backend=settings.engine_backend,
        batch_max_size=settings.batch_max_size or AUTO_GPU_BATCH,
        batch_window_ms=settings.batch_window_ms,
        batching=batching,
        auto_batch=settings.batch_max_size == 0,
    )


async def create_service(
    settings: Settings,
    *,
    address: str | None = None,
    registry: Registry | None = None,
    pool: EnginePool | None = None,
    batching: bool = True,
) -> GrpcService:
    """A bound, not yet started upscale server.

    ``registry`` defaults to ``settings.registry_path``; ``pool`` to one engine
    per upscale method of the registry. ``batching=False`` turns the dynamic
    batcher off (each tile runs alone; for comparisons). The engines load in
    the background once the server starts, and close in its cleanup.
    """
    registry = registry or load_registry(settings.registry_path)
    decoder = DecodePool.from_settings(settings)
    if pool is None:
        pool = build_engine_pool(
            registry,
            cache_dir=settings.resolved_model_cache_dir,
            torch_threads=settings.torch_threads,
            options=engine_options(settings, batching=batching),
            default=DEFAULT_UPSCALE_METHOD,
        )
    servicer = UpscaleServicer(
        registry=registry,
        pool=pool,
        max_input_image_pixels=settings.max_input_image_pixels,
        max_input_image_bytes=settings.max_input_image_bytes,
        decoder=decoder,
    )

    return await create_engine_server(
        address=address or settings.bind_address(settings.address(CAPABILITY.name)),
        settings=settings,
        servicer=servicer,
        add_to_server=pb_grpc.add_UpscaleServiceServicer_to_server,
        service_name=SERVICE_NAME,
        pool=pool,
        decoder=decoder,
    )
