"""Channels to Kiln services, and the one reader of rich error statuses."""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from services.common.errors import (
    ErrorType,
    KilnError,
    ProcessingError,
    UpstreamUnavailable,
    error_from_type,
)
from services.common.mesh_auth import mesh_secret, mesh_token, token_interceptors
from services.common.settings import Settings
from services.common.telemetry import client_interceptors


def create_channel(
    address: str, *, token: str | None = None, max_message_bytes: int = 64 * 1024 * 1024
) -> grpc.aio.Channel:
    """An aio channel with tracing and the mesh's message size limits.

    With ``token`` (a mesh credential, :func:`~services.common.mesh_auth.mesh_token`), an
    interceptor sends it with every call: handy for scripts, tests and backends. The edge
    sends it as call metadata instead (``edge/clients.py``), since grpc.aio runs every
    intercepted call in a task of its own.
    """
    return grpc.aio.insecure_channel(
        address,
        options=[
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ],
        interceptors=[*client_interceptors(), *(token_interceptors(token) if token else ())],
    )


def mesh_channel(address: str, settings: Settings, identity: str) -> grpc.aio.Channel:
    """A channel to a Kiln service that calls as ``identity``, with the settings' limits."""
    return create_channel(
        address,
        token=mesh_token(mesh_secret(settings), identity),
        max_message_bytes=settings.grpc_max_message_bytes,
    )


def error_from_rpc(err: grpc.aio.AioRpcError) -> KilnError:
    """The Kiln error a failed call carries (its ErrorInfo reason), or a generic one.

    Every Kiln service sends an ErrorInfo with its errors. A status without one was
    made by the transport (a message or metadata over its limit, a broken stream, an
    unknown method): a fault of the mesh, never of the caller, so a 500
    ``processing_error`` whatever its code (a RESOURCE_EXHAUSTED from gRPC is not rate
    limiting, nor an INVALID_ARGUMENT from it a bad request).
    """
    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is not None:
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                try:
                    return error_from_type(
                        ErrorType(info.reason), status.message, err.code().name, dict(info.metadata)
                    )
                except ValueError:
                    break
    code = err.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return UpstreamUnavailable()
    return ProcessingError("Internal error while processing the request.")
