"""Fixtures for music: the real server in-process on 127.0.0.1:0, serving the tiny ACE-Step.

One model cache for the session: the first start builds the tiny random-weight
ACE-Step 1.5 (48 kHz stereo, 25 latent frames per second) with
``save_pretrained`` and loads it back with ``AceStepPipeline.from_pretrained``.
Source songs are made here as 16-bit WAV files (a chord with a beat), so the
outside of a repainted region can be compared sample for sample.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2_grpc

from kiln.music.v1 import music_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool
from services.common.grpc_client import mesh_channel
from services.common.grpc_server import GrpcService
from services.common.media.audio import encode_audio
from services.common.registry import DEFAULT_MUSIC_MODEL, Registry, load_registry
from services.common.settings import DEFAULT_REGISTRY, Settings
from services.music.engines import build_music_pool
from services.music.server import create_service
from services.music.servicer import SERVICE_NAME
from tests.services.serving import wait_serving

os.environ.setdefault("HF_HUB_OFFLINE", "1")

#: The tiny model's (and ACE-Step 1.5's) output format and VAE hop.
RATE = 48000
CHANNELS = 2
HOP = 1920
#: The byte limit of source files in the test server.
MAX_INPUT_AUDIO_BYTES = 16 * 1024 * 1024


def song(seconds: float, *, rate: int = RATE, channels: int = CHANNELS, seed: int = 0) -> np.ndarray:
    """A small piece of music as int16 ``(samples, channels)``: a chord pulsing on a beat, some noise."""
    n = round(seconds * rate)
    t = np.arange(n) / rate
    chord = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.2, 329.6)) / 3
    beat = 0.5 + 0.5 * np.cos(2 * np.pi * 2.0 * t)
    noise = np.random.default_rng(seed).normal(0, 0.02, n)
    left = 0.5 * chord * beat + noise
    right = 0.5 * np.roll(chord, 37) * beat + noise
    columns = [left, right][:channels] if channels <= 2 else [left] * channels
    return (np.stack(columns, axis=1) * 32767).astype("<i2")


def wav(samples: np.ndarray, rate: int = RATE) -> bytes:
    """int16 ``(samples, channels)`` as a WAV file."""
    return encode_audio(samples.tobytes(), rate, "wav", channels=samples.shape[1])[0]


@dataclass
class Music:
    service: GrpcService
    pool: EnginePool
    registry: Registry
    settings: Settings
    channel: grpc.aio.Channel
    stub: pb_grpc.MusicServiceStub
    health: health_pb2_grpc.HealthStub


@pytest.fixture(scope="session")
def music_registry() -> Registry:
    return load_registry(Path(DEFAULT_REGISTRY))


@pytest.fixture(scope="session")
async def music(music_registry: Registry, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Music]:
    data_dir = tmp_path_factory.mktemp("music")
    settings = Settings(
        data_dir=data_dir,
        model_cache_dir=data_dir / "models",
        registry_path=DEFAULT_REGISTRY,
        torch_threads=2,
        max_input_audio_bytes=MAX_INPUT_AUDIO_BYTES,
    )
    pool = build_music_pool(
        music_registry,
        cache_dir=settings.resolved_model_cache_dir,
        torch_threads=2,
        default=DEFAULT_MUSIC_MODEL,
    )
    service = await create_service(
        settings,
        address="127.0.0.1:0",
        registry=music_registry,
        pool=pool,
    )
    await service.start()
    channel = mesh_channel(f"127.0.0.1:{service.port}", settings, "tests")
    health = health_pb2_grpc.HealthStub(channel)
    await wait_serving(health, SERVICE_NAME)
    try:
        yield Music(
            service, pool, music_registry, settings, channel, pb_grpc.MusicServiceStub(channel), health
        )
    finally:
        await channel.close()
        await service.stop(1)
