"""Each model's load state for ``/readyz``, from every capability service's
``kiln.common.v1.EngineStatusService`` (``services.common.engine_status``).

Asked of all services at once with a short deadline, beside their health checks; a service
that does not answer in time (down, or an older build without the service) just lists no
models: ``/readyz``'s ``services`` says whether it serves.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from edge.clients import Upstreams
from kiln.common.v1 import engine_status_service_pb2 as pb
from kiln.common.v1 import engine_status_service_pb2_grpc as pb_grpc
from services.catalog import CAPABILITIES
from services.common.engine_status import STATE_NAMES
from services.common.mesh_auth import EDGE, METADATA_KEY, mesh_secret, mesh_token
from services.common.settings import Settings


async def model_states(
    upstreams: Upstreams, settings: Settings, request_id: str, deadline_seconds: float = 2.0
) -> dict[str, dict[str, Any]]:
    """Every model of every capability service that answered: its service, load state
    (``new``, ``loading``, ``ready``, ``unavailable``, ``closed``), why it cannot serve, and
    its running and waiting jobs."""
    metadata = (
        ("x-request-id", request_id),
        (METADATA_KEY, f"Bearer {mesh_token(mesh_secret(settings), EDGE)}"),
    )

    async def ask(name: str) -> list[tuple[str, dict[str, Any]]]:
        stub = pb_grpc.EngineStatusServiceStub(upstreams.channels[name])
        try:
            reply = await stub.GetEngineStatus(
                pb.GetEngineStatusRequest(), timeout=deadline_seconds, metadata=metadata
            )
        except grpc.aio.AioRpcError:
            return []
        return [
            (
                engine.model,
                {
                    "service": name,
                    "state": STATE_NAMES.get(engine.state, "unknown"),
                    "unavailable_reason": engine.unavailable_reason or None,
                    "running_jobs": engine.running_jobs,
                    "waiting_jobs": engine.waiting_jobs,
                },
            )
            for engine in reply.engines
        ]

    names = [entry.name for entry in CAPABILITIES if entry.name in upstreams.channels]
    answers = await asyncio.gather(*(ask(name) for name in names))
    return {model: state for answer in answers for model, state in answer}
