"""Fixtures for segmentation: the real server in-process on 127.0.0.1:0.

The tiny SAM3 is built once per session into this directory's model cache;
every registry here after the first points its weights at that directory, so
the saved model is loaded back through the registry-weights path real weights
take. The session service serves the shipped ``sam3`` plus ``sam3-limited``
(tiny video limits, for the bound checks). Its engines load behind a gate, so
the fixture sees health NOT_SERVING before any model is loaded.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.segmentation.v1 import segmentation_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool
from services.common.grpc_client import mesh_channel
from services.common.grpc_server import GrpcService
from services.common.model_cache import MODEL_LOAD_LOCK, ensure_tiny_model_directory
from services.common.registry import Registry, load_registry
from services.common.settings import Settings
from services.segmentation.engines import Sam3Engine, build_engine_pool
from services.segmentation.server import create_service
from services.segmentation.servicer import SERVICE_NAME
from services.segmentation.tiny import TINY_VERSION, build_tiny_sam3
from tests.services.serving import GatedPool, wait_serving

os.environ.setdefault("HF_HUB_OFFLINE", "1")

LIMITED_MODEL = "sam3-limited"


def sam3_entry(model_id: str, weights: Path, *, score_threshold: float = 0.5, limits: str = "") -> str:
    """A registry entry for a SAM3 model loading the saved tiny weights from ``weights``."""
    limits = limits or "max_width = 4096\nmax_height = 4096\nmax_frames = 3600\nmax_duration_seconds = 120"
    return f"""
[[models]]
id = "{model_id}"
capability = "segmentation"
engine = "sam3"
weights = "{weights}"
options = {{ score_threshold = {score_threshold!r}, mask_threshold = 0.0 }}

[models.limits]
{limits}
"""


@dataclass
class Seg:
    service: GrpcService
    pool: EnginePool
    registry: Registry
    channel: grpc.aio.Channel
    stub: pb_grpc.SegmentationServiceStub
    health: health_pb2_grpc.HealthStub
    status_before_load: int = 0

    def engine(self, model_id: str = "sam3") -> Sam3Engine:
        engine = self.pool.get(model_id)
        assert isinstance(engine, Sam3Engine)
        return engine


@pytest.fixture(scope="session")
def sam3_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The saved tiny SAM3 (tokenizer, detector/, tracker/), built once."""
    cache = tmp_path_factory.mktemp("segmentation-models")
    with MODEL_LOAD_LOCK:
        return ensure_tiny_model_directory(cache, "sam3", build_tiny_sam3, version=TINY_VERSION)


async def start_service(data_dir: Path, registry_text: str, *, gated: bool = False) -> Seg:
    registry_path = data_dir / "registry.toml"
    registry_path.write_text(registry_text)
    settings = Settings(
        data_dir=data_dir, model_cache_dir=data_dir / "models", registry_path=registry_path, torch_threads=2
    )
    registry = load_registry(registry_path)
    pool: EnginePool = build_engine_pool(registry, cache_dir=data_dir / "models", torch_threads=2)
    if gated:
        pool = GatedPool(pool)
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    # A plain channel: with the tracing client interceptor, a stream-stream call abandoned after
    # an error leaves a pending request-iterator task behind (asyncio logs it), which is noise here.
    channel = mesh_channel(f"127.0.0.1:{service.port}", settings, "tests")
    seg = Seg(
        service,
        pool,
        registry,
        channel,
        pb_grpc.SegmentationServiceStub(channel),
        health_pb2_grpc.HealthStub(channel),
    )
    request = health_pb2.HealthCheckRequest(service=SERVICE_NAME)
    if isinstance(pool, GatedPool):
        seg.status_before_load = (await seg.health.Check(request)).status
        pool.gate.set()
    await wait_serving(seg.health, SERVICE_NAME)
    await pool.wait_loaded()
    return seg


async def stop_service(seg: Seg) -> None:
    await seg.channel.close()
    await seg.service.stop(1)


@pytest.fixture(scope="session")
async def seg(tmp_path_factory: pytest.TempPathFactory, sam3_weights: Path) -> AsyncIterator[Seg]:
    limits = "max_width = 48\nmax_height = 48\nmax_frames = 8\nmax_duration_seconds = 1.0"
    text = sam3_entry("sam3", sam3_weights) + sam3_entry(LIMITED_MODEL, sam3_weights, limits=limits)
    service = await start_service(tmp_path_factory.mktemp("segmentation"), text, gated=True)
    try:
        yield service
    finally:
        await stop_service(service)


@pytest.fixture
async def seg_factory(
    tmp_path_factory: pytest.TempPathFactory, sam3_weights: Path
) -> AsyncIterator[Callable[[float], Awaitable[Seg]]]:
    """Starts services whose sam3 has a given score_threshold; stops them after the test."""
    started: list[Seg] = []

    async def make(score_threshold: float) -> Seg:
        text = sam3_entry("sam3", sam3_weights, score_threshold=score_threshold)
        service = await start_service(tmp_path_factory.mktemp("segmentation-threshold"), text)
        started.append(service)
        return service

    try:
        yield make
    finally:
        for service in started:
            await stop_service(service)
