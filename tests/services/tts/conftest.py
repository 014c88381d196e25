"""Fixtures for tts: the shipped registry's speech models on the real Piper voice."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from kiln.tts.v1 import tts_service_pb2 as pb
from kiln.tts.v1 import tts_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool
from services.common.grpc_client import mesh_channel
from services.common.grpc_server import GrpcService
from services.common.registry import Registry, load_registry
from services.common.settings import DEFAULT_REGISTRY, Settings
from services.tts.engines import build_speech_pool
from services.tts.server import create_service
from services.tts.servicer import SERVICE_NAME
from tests.services.serving import wait_serving

#: Three sentences: Piper speaks them as three chunks.
SENTENCES = "The kiln is hot. The clay is ready. We fire at dawn."


async def wait_for_cloning(stub: pb_grpc.TtsServiceStub) -> None:
    """Waits (three minutes at most) until the voice-cloning model, which loads after the default voice, is ready."""
    async with asyncio.timeout(180):
        while True:
            reply = await stub.ListVoices(pb.ListVoicesRequest())
            if any(voice.cloning and voice.languages for voice in reply.voices):
                return
            await asyncio.sleep(0.2)


@pytest.fixture(scope="session")
def tts_registry() -> Registry:
    return load_registry(Path(DEFAULT_REGISTRY))


@pytest.fixture(scope="session")
def tts_model_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One model cache for the session: the tiny Qwen3-TTS is built once."""
    return tmp_path_factory.mktemp("tts-models")


@pytest.fixture(scope="session")
async def speech_pool(tts_registry: Registry, tts_model_cache: Path) -> AsyncIterator[EnginePool]:
    """A loaded pool outside any server (engine-level tests), with a 200-character limit."""
    pool = build_speech_pool(tts_registry, cache_dir=tts_model_cache, max_chars=200, torch_threads=1)
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
async def tts(
    tts_registry: Registry, tts_model_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Tts]:
    """The real tts server on 127.0.0.1:0, its own pool from the settings (300 characters at most)."""
    data_dir = tmp_path_factory.mktemp("tts")
    settings = Settings(
        data_dir=data_dir,
        model_cache_dir=tts_model_cache,
        torch_threads=1,
        max_reference_audio_seconds=30,
        registry_path=DEFAULT_REGISTRY,
        max_speech_chars=300,
    )
    service = await create_service(settings, address="127.0.0.1:0", registry=tts_registry)
    await service.start()
    channel = mesh_channel(f"127.0.0.1:{service.port}", settings, "tests")
    health = health_pb2_grpc.HealthStub(channel)
    await wait_serving(health, SERVICE_NAME)
    stub = pb_grpc.TtsServiceStub(channel)
    await wait_for_cloning(stub)
    try:
        yield Tts(service, settings, channel, stub)
    finally:
        await channel.close()
        await service.stop(1)
