"""Starting a capability service in a test: an engine pool that loads when told, and waiting
for the service's health to turn SERVING."""

from __future__ import annotations

import asyncio
from typing import Any

from grpc_health.v1 import health_pb2, health_pb2_grpc

from services.common.engine import EnginePool, EngineT


class GatedPool(EnginePool[EngineT]):
    """An engine pool that starts loading only once the test opens the gate."""

    def __init__(self, pool: EnginePool[EngineT]) -> None:
        super().__init__(pool.engines, default=pool.default, unavailable=pool.unavailable)
        self.gate = asyncio.Event()

    async def load(self, **kwargs: Any) -> None:
        await self.gate.wait()
        await super().load(**kwargs)


async def wait_serving(health: health_pb2_grpc.HealthStub, service: str) -> None:
    """Watches ``service``'s health until it says SERVING (its models are loaded)."""
    watch = health.Watch(health_pb2.HealthCheckRequest(service=service))
    async for update in watch:
        if update.status == health_pb2.HealthCheckResponse.SERVING:
            break
    watch.cancel()
