"""The llm gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the server (standard interceptors, health,
reflection) around :class:`LlmServicer`; once started, a background task
loads the chat engines on their worker threads, the default chat model
(:data:`~services.common.registry.DEFAULT_CHAT_MODEL`, the tiny Qwen3.5 by
default) first. Health turns SERVING as soon as the default model can serve;
the others keep loading in the background (SmolLM2's first start dequantises
its GGUF file, some 15-25 s, and is cached after that), and a request for a
model still loading gets ``maintenance_mode`` (UNAVAILABLE) until it is ready.

The address is ``address`` when given, else the ``KILN_LLM_ADDRESS`` setting;
``batch_max_size`` is the most requests one engine generates together; 0 (auto)
means 8: continuous batching pays off even on a CPU (3.3x the tokens/s of one
stream with 8 on this 2-core host), unlike the upscalers' convolutions.
"""

from __future__ import annotations

from kiln.llm.v1 import llm_service_pb2_grpc as pb_grpc
from services.common.decoding import DecodePool
from services.common.engine import EnginePool
from services.common.grpc_server import GrpcService, create_engine_server
from services.common.registry import DEFAULT_CHAT_MODEL, Registry, load_registry
from services.common.settings import Settings
from services.llm import CAPABILITY
from services.llm.engines import build_engine_pool
from services.llm.servicer import SERVICE_NAME, LlmServicer

#: Requests generating together when ``batch_max_size`` is 0 (auto).
AUTO_CHAT_BATCH = 8


async def create_service(
    settings: Settings,
    *,
    address: str | None = None,
    registry: Registry | None = None,
    pool: EnginePool | None = None,
) -> GrpcService:
    """A bound, not yet started llm server.

    ``registry`` defaults to ``settings.registry_path``; ``pool`` to one engine
    per chat model of the registry, with tiny models built and GGUF files
    converted in ``settings.resolved_model_cache_dir``. The engines load in the
    background once the server starts, and close in its cleanup.
    """
    registry = registry or load_registry(settings.registry_path)
    decoder = DecodePool.from_settings(settings)
    if pool is None:
        pool = build_engine_pool(
            registry,
            cache_dir=settings.resolved_model_cache_dir,
            torch_threads=settings.torch_threads,
            max_batch=settings.batch_max_size or AUTO_CHAT_BATCH,
            default=DEFAULT_CHAT_MODEL,
        )
    servicer = LlmServicer(
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
        add_to_server=pb_grpc.add_LlmServiceServicer_to_server,
        service_name=SERVICE_NAME,
        pool=pool,
        decoder=decoder,
    )
