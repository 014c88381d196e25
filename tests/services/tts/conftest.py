"""Fixtures for tts: the shipped registry's speech models on the real Piper voice."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.tts.v1 import tts_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool
from services.common.grpc_server import GrpcService
from services.common.registry import Registry, load_registry
from services.common.settings import DEFAULT_REGISTRY, Settings
from services.tts.engines import build_speech_pool
from services.tts.server import create_service
from services.tts.servicer import SERVICE_NAME

#: Three sentences: Piper speaks them as three chunks.
SENTENCES = "The kiln is hot. The clay is ready. We fire at dawn."


@pytest.fixture(scope="session")
def tts_registry() -> Registry:
    return load_registry(Path(DEFAULT_REGISTRY))


@pytest.fixture(scope="session")
async def speech_pool(
    tts_registry: Registry, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[EnginePool]:
    """A loaded pool outside any server (engine-level tests), with a 200-character limit."""
    pool = build_speech_pool(tts_registry, cache_dir=tmp_path_factory.mktemp("tts-models"), max_chars=200)
    await pool.load()
    try:
        yield pool
    finally:
        await pool.close()


@dataclass
class Tts:
    service: GrpcService
    settings: Settings
    channel: grpc.aio.Channel
    stub: pb_grpc.TtsServiceStub


@pytest.fixture(scope="session")
async def tts(tts_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Tts]:
    """The real tts server on 127.0.0.1:0, its own pool from the settings (300 characters at most)."""
    data_dir = tmp_path_factory.mktemp("tts")
    settings = Settings(
        data_dir=data_dir,
        model_cache_dir=data_dir / "models",
        registry_path=DEFAULT_REGISTRY,
        max_speech_chars=300,
    )
    service = await create_service(settings, address="127.0.0.1:0", registry=tts_registry)
    await service.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{service.port}")
    health = health_pb2_grpc.HealthStub(channel)
    watch = health.Watch(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
    async for update in watch:
        if update.status == health_pb2.HealthCheckResponse.SERVING:
            break
    watch.cancel()
    try:
        yield Tts(service, settings, channel, pb_grpc.TtsServiceStub(channel))
    finally:
        await channel.close()
        await service.stop(1)
