"""The tts gRPC server: bootstrap, voice loading, shutdown.

``create_service`` builds the standard server (interceptors, health,
reflection) around :class:`TtsServicer`; once started, a background task loads
the voices on their worker threads, and health turns SERVING as soon as the
default voice (``piper-joe``) can speak.

Settings used: ``KILN_TTS_ADDRESS`` (unless ``address`` is given),
``registry_path``, ``resolved_model_cache_dir``, ``max_speech_chars``,
``max_reference_audio_seconds``, ``max_reference_audio_bytes``, ``torch_threads``
and ``grpc_max_message_bytes``. The service runs in its own environment
(``.venv-tts``: qwen-tts pins transformers 4.57.3); ``kiln up`` starts it there.
"""

from __future__ import annotations

from kiln.tts.v1 import tts_service_pb2_grpc as pb_grpc
from services.common.decoding import DecodePool
from services.common.engine import EnginePool
from services.common.grpc_server import GrpcService, create_engine_server
from services.common.registry import Registry, load_registry
from services.common.settings import Settings
from services.tts import CAPABILITY
from services.tts.engines import DEFAULT_SPEECH_MODEL, build_speech_pool
from services.tts.servicer import SERVICE_NAME, TtsServicer


async def create_service(
    settings: Settings,
    *,
    address: str | None = None,
    registry: Registry | None = None,
    pool: EnginePool | None = None,
) -> GrpcService:
    """A bound, not yet started tts server.

    ``registry`` defaults to ``settings.registry_path``; ``pool`` to one engine
    per speech model of the registry. The engines load in the background once
    the server starts, and close in its cleanup.
    """
    registry = registry or load_registry(settings.registry_path)
    decoder = DecodePool.from_settings(settings)
    if pool is None:
        pool = build_speech_pool(
            registry,
            cache_dir=settings.resolved_model_cache_dir,
            max_chars=settings.max_speech_chars,
            default=DEFAULT_SPEECH_MODEL,
            torch_threads=settings.torch_threads,
        )
    return await create_engine_server(
        address=address or settings.bind_address(settings.address(CAPABILITY.name)),
        settings=settings,
        servicer=TtsServicer(
            registry=registry,
            pool=pool,
            max_reference_seconds=settings.max_reference_audio_seconds,
            max_reference_bytes=settings.max_reference_audio_bytes,
            decoder=decoder,
        ),
        add_to_server=pb_grpc.add_TtsServiceServicer_to_server,
        service_name=SERVICE_NAME,
        pool=pool,
        decoder=decoder,
    )
