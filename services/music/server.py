"""The music gRPC server: bootstrap, model loading, shutdown.

``create_service`` builds the standard server (interceptors, health,
reflection) around :class:`MusicServicer`; once started, a background task
loads the music models on their worker threads (building the tiny ACE-Step
on first use), and health turns SERVING as soon as the default model
(``ace-step-v1.5``) can serve.

Settings used: ``KILN_MUSIC_ADDRESS`` (unless ``address`` is given),
``registry_path``, ``resolved_model_cache_dir``, ``torch_threads``,
``max_prompt_chars``, ``max_input_audio_bytes`` (unless given) and
``grpc_max_message_bytes``.
"""

from __future__ import annotations

from kiln.music.v1 import music_service_pb2_grpc as pb_grpc
from services.common.decoding import DecodePool
from services.common.engine import EnginePool
from services.common.grpc_server import GrpcService, create_engine_server
from services.common.registry import DEFAULT_MUSIC_MODEL, Registry, load_registry
from services.common.settings import Settings
from services.music import CAPABILITY
from services.music.engines import build_music_pool
from services.music.servicer import SERVICE_NAME, MusicServicer


async def create_service(
    settings: Settings,
    *,
    address: str | None = None,
    registry: Registry | None = None,
    pool: EnginePool | None = None,
    max_input_audio_bytes: int | None = None,
) -> GrpcService:
    """A bound, not yet started music server.

    ``registry`` defaults to ``settings.registry_path``; ``pool`` to one engine
    per music model of the registry, tiny models built in
    ``settings.resolved_model_cache_dir``. The engines load in the background
    once the server starts, and close in its cleanup.
    """
    registry = registry or load_registry(settings.registry_path)
    decoder = DecodePool.from_settings(settings)
    if pool is None:
        pool = build_music_pool(
            registry,
            cache_dir=settings.resolved_model_cache_dir,
            torch_threads=settings.torch_threads,
            default=DEFAULT_MUSIC_MODEL,
        )
    if max_input_audio_bytes is None:
        max_input_audio_bytes = settings.max_input_audio_bytes
    servicer = MusicServicer(
        registry=registry,
        pool=pool,
        max_prompt_chars=settings.max_prompt_chars,
        max_input_audio_bytes=max_input_audio_bytes,
        decoder=decoder,
    )
    return await create_engine_server(
        address=address or settings.bind_address(settings.address(CAPABILITY.name)),
        settings=settings,
        servicer=servicer,
        add_to_server=pb_grpc.add_MusicServiceServicer_to_server,
        service_name=SERVICE_NAME,
        pool=pool,
        decoder=decoder,
    )
