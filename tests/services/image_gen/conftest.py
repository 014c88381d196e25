"""Fixtures for image_gen: the real server in-process on 127.0.0.1:0, built once per session.

The registry is the shipped one plus a model whose weights directory does not
exist (to see an unavailable model reported, not faked). Engines load behind a
gate, so the fixture can observe health saying NOT_SERVING before any model is
loaded, without racing the load.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kiln.image.v1 import image_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool
from services.common.grpc_client import mesh_channel
from services.common.grpc_server import GrpcService
from services.common.registry import Registry, load_registry
from services.common.settings import DEFAULT_REGISTRY, Settings
from services.image_gen.engines import build_engine_pool
from services.image_gen.server import create_service
from services.image_gen.servicer import SERVICE_NAME
from tests.services.serving import GatedPool, wait_serving

os.environ.setdefault("HF_HUB_OFFLINE", "1")

MISSING_MODEL = "z-image-missing"
MISSING_WEIGHTS = """

[[models]]
id = "z-image-missing"
capability = "text-to-image"
description = "Points at a weights directory that does not exist"
engine = "zimage"
weights = "no-such-weights"

[models.limits]
max_width = 1024
max_height = 1024

[models.defaults]
steps = 8
"""


@dataclass
class ImageGen:
    service: GrpcService
    pool: EnginePool
    registry: Registry
    settings: Settings
    channel: grpc.aio.Channel
    stub: pb_grpc.ImageServiceStub
    health: health_pb2_grpc.HealthStub
    #: Health of the service as seen before any model was loaded.
    status_before_load: int
    #: Health after the default model loaded.
    status_after_load: int


@pytest.fixture(scope="session")
def image_gen_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny-model cache of this directory's tests (each tiny model is built once)."""
    return tmp_path_factory.mktemp("image-gen-models")


@pytest.fixture(scope="session")
async def image_gen(
    tmp_path_factory: pytest.TempPathFactory, image_gen_cache: Path
) -> AsyncIterator[ImageGen]:
    data_dir = tmp_path_factory.mktemp("image-gen")
    registry_path = data_dir / "registry.toml"
    registry_path.write_text(DEFAULT_REGISTRY.read_text() + MISSING_WEIGHTS)
    settings = Settings(
        data_dir=data_dir, model_cache_dir=image_gen_cache, registry_path=registry_path, torch_threads=2
    )
    registry = load_registry(registry_path)
    pool = GatedPool(
        build_engine_pool(registry, cache_dir=image_gen_cache, torch_threads=settings.torch_threads)
    )
    service = await create_service(settings, address="127.0.0.1:0", registry=registry, pool=pool)
    await service.start()
    channel = mesh_channel(f"127.0.0.1:{service.port}", settings, "tests")
    health = health_pb2_grpc.HealthStub(channel)
    try:
        before = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        pool.gate.set()
        await wait_serving(health, SERVICE_NAME)
        after = await health.Check(health_pb2.HealthCheckRequest(service=SERVICE_NAME))
        await pool.wait_loaded()
        yield ImageGen(
            service=service,
            pool=pool,
            registry=registry,
            settings=settings,
            channel=channel,
            stub=pb_grpc.ImageServiceStub(channel),
            health=health,
            status_before_load=before.status,
            status_after_load=after.status,
        )
    finally:
        await channel.close()
        await service.stop(1)
