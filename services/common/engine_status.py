"""``kiln.common.v1.EngineStatusService``: every capability service's model load states.

Served beside the capability's own service by
:func:`~services.common.grpc_server.create_engine_server`; the edge's ``/readyz`` asks it
for each model's state (new, loading, ready, unavailable, closed) and queue.
"""

from __future__ import annotations

from typing import Any

import grpc

from kiln.common.v1 import engine_status_service_pb2 as pb
from kiln.common.v1 import engine_status_service_pb2_grpc as pb_grpc
from services.common.engine import EnginePool, EngineState

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["EngineStatusService"].full_name

_STATES = {
    EngineState.NEW: pb.ENGINE_LOAD_STATE_NEW,
    EngineState.LOADING: pb.ENGINE_LOAD_STATE_LOADING,
    EngineState.READY: pb.ENGINE_LOAD_STATE_READY,
    EngineState.UNAVAILABLE: pb.ENGINE_LOAD_STATE_UNAVAILABLE,
    EngineState.CLOSED: pb.ENGINE_LOAD_STATE_CLOSED,
}
#: The proto enum's values by state name (``ENGINE_LOAD_STATE_READY`` -> ``ready``), for callers.
STATE_NAMES = {number: state.value for state, number in _STATES.items()}


class EngineStatusServicer(pb_grpc.EngineStatusServiceServicer):
    """Reads the pool's engines (in-memory counters only: cheap enough for every probe)."""

    def __init__(self, pool: EnginePool[Any]) -> None:
        self.pool = pool

    async def GetEngineStatus(
        self, request: pb.GetEngineStatusRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetEngineStatusResponse:
        response = pb.GetEngineStatusResponse()
        names = sorted(self.pool.engines, key=lambda name: name != self.pool.default)
        for name in names:
            health = self.pool.engines[name].health()
            response.engines.add(
                model=name,
                state=_STATES[health.state],
                unavailable_reason=health.unavailable_reason or "",
                running_jobs=health.running_jobs,
                waiting_jobs=health.waiting_jobs,
            )
        for name, reason in self.pool.unavailable.items():
            response.engines.add(
                model=name, state=pb.ENGINE_LOAD_STATE_UNAVAILABLE, unavailable_reason=reason
            )
        return response
