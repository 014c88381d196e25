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
from services.common.grpc_server import EngineService
from services.common.settings import Settings
from services.upscale import CAPABILITY
from services.upscale.engines import AUTO_GPU_BATCH, DEFAULT_UPSCALE_METHOD, EngineOptions, build_engine_pool
from services.upscale.servicer import UpscaleServicer


def engine_options(settings: Settings, *, batching: bool = True) -> EngineOptions:
    """The engines' backend and batching settings."""
    return EngineOptions(
        backend=settings.engine_backend,
        batch_max_size=settings.batch_max_size or AUTO_GPU_BATCH,
        batch_window_ms=settings.batch_window_ms,
        batching=batching,
        auto_batch=settings.batch_max_size == 0,
    )


#: The upscale capability's server: its catalog entry, its engines and its servicer.
SERVICE = EngineService(
    capability=CAPABILITY,
    add_to_server=pb_grpc.add_UpscaleServiceServicer_to_server,
    build_pool=build_engine_pool,
    default_model=DEFAULT_UPSCALE_METHOD,
    pool_options=lambda settings: {"options": engine_options(settings)},
    servicer=UpscaleServicer,
)


#: ``create_service(settings, *, address=None, registry=None, pool=None)``: see :meth:`EngineService.create`.
create_service = SERVICE.create
